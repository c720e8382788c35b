"""A TFDS dataset built locally (ArrayRecord) and read end to end, with the network cut."""

import dataclasses
import socket

import numpy as np
import pytest

from polyjax.data import DataConfig, make_pipeline, sources

tfds = pytest.importorskip("tensorflow_datasets")

SCENES = sources.shakespeare_scenes()
SPLITS = {"train": SCENES[:30], "validation": SCENES[30:36]}


class PolyjaxTestScenes(tfds.core.GeneratorBasedBuilder):
    """Shakespeare scenes as a text dataset with train and validation splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(docs) for name, docs in SPLITS.items()}

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def data_dir(tmp_path):
    builder = PolyjaxTestScenes(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return str(tmp_path / "tfds")


def _docs(span, eos):
    ids = span.read(0, len(span))
    ends = np.flatnonzero(ids == eos)
    return [
        bytes(ids[a + 1 : b].astype(np.uint8)).decode()
        for a, b in zip([-1, *ends], ends, strict=False)
    ]


def test_tfds_source_read_end_to_end(data_dir, tmp_path):
    cfg = DataConfig(
        source="tfds:polyjax_test_scenes",
        val_split="validation",
        tfds_data_dir=data_dir,
        tokenizer="byte",
        seq_len=127,
        global_batch=8,
        document_boundaries=True,
        cache_dir=str(tmp_path / "cache"),
    )
    p = make_pipeline(cfg)
    # TFDS stores examples in its own (hashed) order: compare the documents as sets.
    assert sorted(_docs(p.train.span, 256)) == sorted(SPLITS["train"])
    assert sorted(_docs(p.val.span, 256)) == sorted(SPLITS["validation"])
    b = next(p.train_iter())
    assert b["inputs"].shape == (8, 127) and p.eval_batches(1)[0]["targets"].shape == (8, 127)
    held = make_pipeline(dataclasses.replace(cfg, val_split=None, val_fraction=0.1))
    assert len(_docs(held.val.span, 256)) == 3 and len(_docs(held.train.span, 256)) == 27


def test_tfds_errors_say_how_to_prepare_and_name_split_and_field(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"not prepared .*tfds build polyjax_test_scenes"):
        sources.TFDSText("polyjax_test_scenes", "train", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="'no_such_corpus_xyz' is not prepared"):
        sources.TFDSText("no_such_corpus_xyz", "train", data_dir)
    with pytest.raises(ValueError, match=r"split='test' .* valid: \['train', 'validation'\]"):
        sources.TFDSText("polyjax_test_scenes", "test", data_dir)
    src = sources.open_source("tfds:polyjax_test_scenes#body", tfds_data_dir=data_dir)
    with pytest.raises(ValueError, match=r"no text field 'body' \(features: \['text'\]\)"):
        src[0]


def test_tfds_size_bound_reads_the_split_metadata_and_names_the_command(data_dir, tmp_path):
    import tensorflow_datasets as tfds

    from polyjax.data import validate

    splits = tfds.builder("polyjax_test_scenes", data_dir=data_dir).info.splits
    size = splits["train"].num_bytes + splits["validation"].num_bytes
    assert size > sum(len(s.encode()) for s in SCENES[:36])  # the serialized records
    cfg = DataConfig(
        source="tfds:polyjax_test_scenes",
        val_split="validation",
        tfds_data_dir=data_dir,
        tokenizer="byte",
        max_tokenize_bytes=size - 1,
    )
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert (
        f"--source tfds:polyjax_test_scenes --tfds_data_dir {data_dir} --tokenizer byte"
        in str(e.value)
    ) and "\n" not in str(e.value)
    assert validate(dataclasses.replace(cfg, max_tokenize_bytes=size)).text_bytes == size
