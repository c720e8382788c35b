"""PolyCom decoders for Hugging Face transformers (PyTorch), shipped with a polyjax export.

`python -m polyjax.hf export` copies this file next to the weights; load with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.

The model: token embedding, pre-RMSNorm blocks (rotary attention with grouped
key/value heads and optional QK-norm over the whole projection; a dense FFN or a
mixture of experts), a final RMSNorm and an untied head; no biases. The FFN is
act(x W_up) W_down, or act(x W_gate, x W_up) W_down for gated activations.

PolyCom coefficients are stored DESCENDING, as in the paper's official code:
`act_fn.weight[..., 0]` multiplies the highest power r and `weight[..., r-1]` the
first; `act_fn.bias` is a_0.
  PolyReLU  a_0 + sum_i a_i relu(x)^i
  PolyNorm  a_0 + sum_i a_i x^i / sqrt(mean(x^(2i)) + eps)  (mean over the FFN width,
            statistics in float32)
Mixture of experts: softmax over all experts, the top k probabilities weight the
chosen experts' outputs (renormalised only with `norm_topk_prob`); PolyCom
coefficients are shared by a layer's experts (`mlp.act_fn`) or one set per expert
(`mlp.experts.<e>.act_fn`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

GATED = ("glu", "swiglu", "polynorm_glu")
COEFFS = ("poly", "polycom", "polyrelu", "polyprelu", "polynorm", "polyrelu_norm", "polynorm_glu")
SLOPE = ("prelu", "polyprelu")
RRELU_SLOPE = (1.0 / 8.0 + 1.0 / 3.0) / 2.0  # RReLU at inference: the mean slope


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32, no gain."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


BASES = {
    "identity": lambda x: x,
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "relu6": F.relu6,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "rrelu": lambda x: F.leaky_relu(x, RRELU_SLOPE),
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "elu": F.elu,
    "celu": F.celu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
ACTIVATIONS = (*BASES, "prelu", *GATED, *COEFFS)


class PolycomConfig(PretrainedConfig):
    """`hidden_act`: the activation's polyjax name (polynorm, polyrelu, swiglu, ...);
    `poly_order`, `poly_eps`, `poly_base`, `poly_type`: PolyCom's order r, PolyNorm's
    epsilon, and the base function and type (1 or 2) of the generic `polycom`.
    `num_experts` 0 is a dense model; `intermediate_size` is then the FFN width,
    otherwise one expert's."""

    model_type = "polycom"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        intermediate_size: int = 8256,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        hidden_act: str = "polynorm",
        poly_order: int = 3,
        poly_eps: float = 1e-6,
        poly_base: str = "relu",
        poly_type: int = 1,
        num_experts: int = 0,
        num_experts_per_tok: int = 1,
        norm_topk_prob: bool = False,
        per_expert_coeffs: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r}: valid: {', '.join(ACTIVATIONS)}")
        if tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True: PolyCom exports have an untied head")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.qk_norm = qk_norm
        self.hidden_act = hidden_act
        self.poly_order = poly_order
        self.poly_eps = poly_eps
        self.poly_base = poly_base
        self.poly_type = poly_type
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.per_expert_coeffs = per_expert_coeffs
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=False, **kwargs)


class PolycomActivation(nn.Module):
    """The configured activation with its learnable parts (descending coefficients)."""

    def __init__(self, config: PolycomConfig):
        super().__init__()
        self.name, self.eps = config.hidden_act, config.poly_eps
        self.base, self.type = config.poly_base, config.poly_type
        r = config.poly_order
        if self.name in COEFFS:
            self.weight = nn.Parameter(torch.full((r,), 1.0 / r))
            self.bias = nn.Parameter(torch.zeros(1))
        if self.name in SLOPE:
            self.slope = nn.Parameter(torch.full((1,), 0.25))

    def _prelu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, self.slope.to(x.dtype) * x)

    def _type1(self, x: torch.Tensor, rho) -> torch.Tensor:
        """a_0 + sum_i a_i rho(x)^i, Horner form in float32."""
        w, z = self.weight.float(), rho(x).float()
        y = w[0] * z
        for c in w[1:]:
            y = (y + c) * z
        return (y + self.bias.float()).to(x.dtype)

    def _type2(self, x: torch.Tensor, rho) -> torch.Tensor:
        """a_0 + sum_i a_i rho(x^i); w[r - i] multiplies the i-th term."""
        r = self.weight.shape[-1]
        y = self.bias.to(x.dtype)
        for i in range(1, r + 1):
            y = y + self.weight[r - i].to(x.dtype) * rho(x**i).to(x.dtype)
        return y.to(x.dtype)

    def _polynorm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        r = self.weight.shape[-1]
        y = self.bias.float()
        for i in range(1, r + 1):
            y = y + self.weight[r - i].float() * rms_normalize(x32**i, self.eps)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        name = self.name
        if name == "glu":
            return torch.sigmoid(x) * up
        if name == "swiglu":
            return F.silu(x) * up
        if name == "polynorm_glu":
            return self._polynorm(x) * up
        if name == "polynorm":
            return self._polynorm(x)
        if name == "polyrelu_norm":
            return self._polynorm(F.relu(x))
        if name == "polyrelu":
            return self._type1(x, F.relu)
        if name == "polyprelu":
            return self._type1(x, self._prelu)
        if name == "poly":
            return self._type1(x, lambda z: z)
        if name == "polycom":
            if self.base == "rms_norm":
                rho = lambda z: rms_normalize(z, self.eps).to(z.dtype)
            else:
                rho = BASES[self.base]
            return (self._type1 if self.type == 1 else self._type2)(x, rho)
        if name == "prelu":
            return self._prelu(x)
        return BASES[name](x)


class PolycomMLP(nn.Module):
    """act(x W_up) W_down, or act(x W_gate, x W_up) W_down when gated. An expert
    without its own coefficients uses the activation passed to forward."""

    def __init__(self, config: PolycomConfig, own_activation: bool = True):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gated = config.hidden_act in GATED
        if self.gated:
            self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.act_fn = PolycomActivation(config) if own_activation else None

    def forward(self, x: torch.Tensor, act_fn: PolycomActivation | None = None) -> torch.Tensor:
        act = self.act_fn if act_fn is None else act_fn
        h = act(self.gate_proj(x), self.up_proj(x)) if self.gated else act(self.up_proj(x))
        return self.down_proj(h)


class PolycomMoE(nn.Module):
    """Softmax router over all experts, top-k, the experts' outputs weighted by
    their probabilities; no token is dropped."""

    def __init__(self, config: PolycomConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        own = config.per_expert_coeffs and config.hidden_act in COEFFS
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            PolycomMLP(config, own_activation=own) for _ in range(config.num_experts)
        )
        self.act_fn = None if own else PolycomActivation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = F.linear(x.float(), self.gate.weight.float())
        probs = torch.softmax(logits, dim=-1)
        gates, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            gates = gates / gates.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                y = expert(x[token], self.act_fn) * gates[token, slot, None].to(x.dtype)
                out.index_add_(0, token, y)
        return out.reshape(shape)


class PolycomRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x, self.eps) * self.weight.float()).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half layout (the halves of a head are the pairs), float32."""
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class PolycomAttention(nn.Module):
    def __init__(self, config: PolycomConfig, layer_idx: int):
        super().__init__()
        d, k = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            k,
        )
        self.q_proj = nn.Linear(d, self.heads * k, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * k, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * k, bias=False)
        self.o_proj = nn.Linear(self.heads * k, d, bias=False)
        if config.qk_norm:
            self.q_norm = PolycomRMSNorm(self.heads * k, config.rms_norm_eps)
            self.k_norm = PolycomRMSNorm(self.kv_heads * k, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, past_key_values=None):
        b, n, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotate(q.view(b, n, self.heads, self.head_dim), cos, sin).transpose(1, 2)
        k = rotate(k.view(b, n, self.kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class PolycomDecoderLayer(nn.Module):
    def __init__(self, config: PolycomConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = PolycomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = PolycomAttention(config, layer_idx)
        self.post_attention_layernorm = PolycomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = PolycomMoE(config) if config.num_experts else PolycomMLP(config)

    def forward(self, x, cos, sin, mask, past_key_values=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values)
        return h + self.mlp(self.post_attention_layernorm(h))


class PolycomPreTrainedModel(PreTrainedModel):
    config_class = PolycomConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["PolycomDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, PolycomRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, PolycomActivation):
            if hasattr(module, "weight"):
                nn.init.constant_(module.weight, 1.0 / module.weight.shape[-1])
                nn.init.zeros_(module.bias)
            if hasattr(module, "slope"):
                nn.init.constant_(module.slope, 0.25)


class PolycomModel(PolycomPreTrainedModel):
    def __init__(self, config: PolycomConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            PolycomDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = PolycomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        b, n = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = past + n
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
            else:
                position_ids = torch.arange(past, total, device=input_ids.device)[None].expand(b, n)
        half = self.config.head_dim // 2
        freq = self.config.rope_theta ** (
            -torch.arange(half, dtype=torch.float32, device=input_ids.device) / half
        )
        angle = position_ids.float()[..., None] * freq  # b x n x half
        cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]
        rows = torch.arange(past, total, device=input_ids.device)[:, None]
        cols = torch.arange(total, device=input_ids.device)[None]
        mask = (cols <= rows)[None, None].expand(b, 1, n, total)
        if attention_mask is not None:
            # padding is never attended to (a padding query sees itself: finite softmax)
            mask = mask & (attention_mask[:, None, None, :total].bool() | (cols == rows))
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, past_key_values)
        return self.norm(x)


class PolycomForCausalLM(PolycomPreTrainedModel, GenerationMixin):
    def __init__(self, config: PolycomConfig):
        super().__init__(config)
        self.model = PolycomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        labels=None,
        **kwargs,
    ):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        h = self.model(input_ids, attention_mask, position_ids, past_key_values)
        logits = self.lm_head(h).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None
        )
