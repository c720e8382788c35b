"""The paper's training studies, by name: each a set of arms compared over seeds.

python launch.py --experiment order   # or order_polynorm, composition, activations, ...
"""

from __future__ import annotations

from experiments.study import Arm, Study


def _act(label: str, family: str = "dense") -> Arm:
    return Arm(label, act=label, family=family)


def _orders(act: str) -> tuple[Arm, ...]:
    return tuple(
        Arm(f"r={r}", act, overrides=(("model.activation.order", r),)) for r in (1, 2, 3, 4)
    )


STUDIES = {
    s.name: s
    for s in [
        Study("order", "Order of PolyReLU", "Figure 5a, Figure 8", _orders("polyrelu"), "r=3"),
        # the paper's order ablation is on PolyReLU; the same for PolyNorm
        Study(
            "order_polynorm",
            "Order of PolyNorm",
            "Figure 5a (PolyNorm)",
            _orders("polynorm"),
            "r=3",
        ),
        Study(
            "composition",
            "Composition function",
            "Figure 5b, Figure 9",
            tuple(_act(a) for a in ("polyrelu", "polyprelu", "polynorm", "polyrelu_norm")),
            reference="polyrelu",
        ),
        Study(
            "relu_variants",
            "ReLU variants",
            "Figure 5c, Figure 10",
            tuple(_act(a) for a in ("relu", "relu2", "polyrelu")),
            reference="polyrelu",
        ),
        Study(
            "activations",
            "Activations at equal parameters (dense)",
            "Figure 1, Table 1",
            tuple(_act(a) for a in ("swiglu", "gelu", "relu", "polyrelu", "polynorm")),
            reference="swiglu",
        ),
        Study(
            "moe",
            "MoE experts: SwiGLU vs PolyNorm",
            "Figure 3, Table 2",
            (
                _act("swiglu", "moe"),
                _act("polynorm", "moe"),
                # the gates renormalised to sum to 1 (Mixtral-style): is the SwiGLU
                # deficit the unnormalised top-2 gates' shrinking of expert outputs?
                Arm("swiglu-renorm", "swiglu", "moe", (("model.moe.renormalize", True),)),
                # the dense FFNs of the same width: what the MoE adds or costs each one
                Arm("dense-swiglu", "swiglu"),
                Arm("dense-polynorm", "polynorm"),
            ),
            reference="swiglu",
        ),
    ]
}
