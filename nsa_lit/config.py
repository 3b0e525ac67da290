"""Model configuration: every architectural hyperparameter, typed, with a default.

Invalid combinations fail at construction with a ``ValueError`` naming the field. The defaults are
the 340M ASA model; ``README.md`` says which values are the paper's and which are ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kernels.dispatch import BACKENDS

# Layer kinds of ``layer_pattern``: which attention branches a layer runs.
LAYER_KINDS: dict[str, tuple[str, ...]] = {
    "F": ("full",),
    "N": ("compression", "selection", "window"),  # narrowed by ``nsa_branches``
    "L": ("window",),
    "G": ("compression", "selection"),
}
BRANCHES = ("compression", "selection", "window")


@dataclass
class ModelConfig:
    """Architecture of the decoder-only transformer and of its attention layers.

    Layer kinds (letters of ``layer_pattern``, repeated to ``n_layers``):
      ``F`` full causal attention (GQA), ``N`` NSA (the ``nsa_branches``, GQA key/values),
      ``L`` local layer (sliding window; key/values from ``local_kv``),
      ``G`` global layer (compression + selection; key/values from ``global_kv``).
    ASA = ``layer_pattern="LG"``, ``local_kv="latent"`` (MLA), ``global_kv="latent"`` with
    ``global_latent_groups=2`` (GLA), ``q_share=4``.
    """

    # Transformer
    vocab_size: int = 32000
    n_layers: int = 24
    d_model: int = 1024
    n_heads: int = 16
    head_dim: int = 64
    mlp_hidden: int = 2816
    seq_len: int = 8192
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    # Which attention each layer runs
    layer_pattern: str = "LG"
    nsa_branches: list[str] = field(default_factory=lambda: list(BRANCHES))

    # Key/value sources
    n_kv_heads: int = 4
    local_kv: Literal["latent", "grouped"] = "latent"
    global_kv: Literal["latent", "grouped"] = "latent"
    latent_dim: int = 256
    rope_dim: int = 32
    local_latent_groups: int = 1
    global_latent_groups: int = 2
    latent_form: Literal["auto", "absorbed", "expanded"] = "auto"

    # Sparse attention branches
    window: int = 512
    compress_block: int = 32
    compress_stride: int = 16
    compress_method: Literal["mlp", "mean"] = "mlp"
    select_block: int = 64
    top_n: int = 16
    num_local_blocks: int = 2
    q_share: int = 4

    # Which implementation computes the attention branches
    kernel_backend: Literal["auto", "triton", "reference"] = "auto"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"model config field `{name}`: {why}")

        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "head_dim", "mlp_hidden",
                     "seq_len", "n_kv_heads", "latent_dim", "local_latent_groups",
                     "global_latent_groups", "window", "compress_block", "compress_stride",
                     "select_block", "top_n", "q_share"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        need(self.num_local_blocks >= 0, "num_local_blocks", "must be >= 0")
        need(self.rope_dim >= 0 and self.rope_dim % 2 == 0, "rope_dim", "must be even and >= 0")
        need(self.head_dim % 2 == 0, "head_dim", "must be even (RoPE rotates pairs)")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")

        unknown = sorted(set(self.layer_pattern) - set(LAYER_KINDS))
        need(bool(self.layer_pattern) and not unknown, "layer_pattern",
             f"letters must be from {''.join(LAYER_KINDS)} (F full, N NSA, L local, G global); "
             f"got {self.layer_pattern!r}" + (f" with unknown {unknown}" if unknown else ""))
        need(self.n_layers % len(self.layer_pattern) == 0, "layer_pattern",
             f"its length ({len(self.layer_pattern)}) must divide n_layers ({self.n_layers})")
        bad = sorted(set(self.nsa_branches) - set(BRANCHES))
        need(bool(self.nsa_branches) and not bad, "nsa_branches",
             f"must be a non-empty subset of {list(BRANCHES)}, got {self.nsa_branches}")
        need(len(set(self.nsa_branches)) == len(self.nsa_branches), "nsa_branches",
             "lists a branch twice")
        need(self.local_kv in ("latent", "grouped"), "local_kv", "must be 'latent' or 'grouped'")
        need(self.global_kv in ("latent", "grouped"), "global_kv", "must be 'latent' or 'grouped'")
        need(self.latent_form in ("auto", "absorbed", "expanded"), "latent_form",
             "must be 'auto', 'absorbed' or 'expanded'")
        need(self.compress_method in ("mlp", "mean"), "compress_method", "must be 'mlp' or 'mean'")
        need(self.kernel_backend in BACKENDS, "kernel_backend", f"must be one of {BACKENDS}")

        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        for name in ("local_latent_groups", "global_latent_groups"):
            groups = getattr(self, name)
            need(self.n_heads % groups == 0, name,
                 f"n_heads ({self.n_heads}) must be divisible by {name} ({groups})")
            need(self.latent_dim % groups == 0, name,
                 f"latent_dim ({self.latent_dim}) must be divisible by {name} ({groups})")

        if self.uses_branch("compression") or self.uses_branch("selection"):
            need(self.compress_block % self.compress_stride == 0, "compress_block",
                 f"must be a multiple of compress_stride ({self.compress_stride}), "
                 f"got {self.compress_block}")
            need(self.select_block % self.compress_stride == 0, "select_block",
                 f"must be a multiple of compress_stride ({self.compress_stride}), "
                 f"got {self.select_block}")
            need(self.seq_len >= self.compress_block, "seq_len",
                 f"must be >= compress_block ({self.compress_block}), got {self.seq_len}")
        if self.uses_branch("selection"):
            need(self.seq_len % self.select_block == 0, "seq_len",
                 f"must be a multiple of select_block ({self.select_block}), got {self.seq_len}")
            need(self.select_block % self.q_share == 0, "q_share",
                 f"must divide select_block ({self.select_block}), got {self.q_share}")
            need(self.top_n >= 1 + self.num_local_blocks, "top_n",
                 f"must be >= 1 + num_local_blocks ({1 + self.num_local_blocks}): the first and "
                 f"the local blocks are always selected")

    # -- derived quantities ------------------------------------------------------------------
    @property
    def layer_kinds(self) -> list[str]:
        """One letter per layer."""
        return list(self.layer_pattern * (self.n_layers // len(self.layer_pattern)))

    def branches(self, kind: str) -> tuple[str, ...]:
        """Attention branches that a layer of ``kind`` runs, in a fixed order."""
        if kind == "N":
            return tuple(b for b in BRANCHES if b in self.nsa_branches)
        return LAYER_KINDS[kind]

    def kv_source(self, kind: str) -> str:
        """``"grouped"`` (GQA key/value heads) or ``"latent"`` (MLA/GLA latent)."""
        return {"F": "grouped", "N": "grouped", "L": self.local_kv, "G": self.global_kv}[kind]

    def latent_groups(self, kind: str) -> int:
        return self.local_latent_groups if kind == "L" else self.global_latent_groups

    def branch_form(self, branch: str) -> str:
        """Form in which a latent layer trains ``branch``: ``latent_form``, or under ``"auto"``
        the faster one measured on an H200 (benchmarks/README.md): absorbed for selection (all
        heads of a latent group read one latent block), expanded for the window and compression
        (narrower per-head keys: 96/64 instead of 288/256 or 160/128)."""
        if self.latent_form != "auto":
            return self.latent_form
        return "absorbed" if branch == "selection" else "expanded"

    def layer_q_share(self, kind: str) -> int:
        """Query sharing applies to the selection of global layers only."""
        return self.q_share if kind == "G" else 1

    def uses_branch(self, branch: str) -> bool:
        return any(branch in self.branches(k) for k in set(self.layer_pattern))
