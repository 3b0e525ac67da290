"""Model configuration: every architectural hyperparameter, typed, with a default.

Invalid combinations fail at construction with a ``ValueError`` naming the field. The defaults are
the 340M ASA model; ``README.md`` says which values are the paper's and which are ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from kernels.blocks import num_compressed
from kernels.dispatch import BACKENDS


class Branch(str, Enum):
    """An attention branch. A ``str`` enum: members equal their names (``Branch.WINDOW == "window"``),
    so YAML lists such as ``nsa_branches`` hold plain strings."""

    FULL = "full"
    COMPRESSION = "compression"
    SELECTION = "selection"
    WINDOW = "window"

    def __str__(self) -> str:
        return self.value


class KVSource(str, Enum):
    """Where a layer's keys and values come from."""

    GROUPED = "grouped"  # GQA: n_kv_heads key/value heads
    LATENT = "latent"    # MLA (one latent group) or GLA (several): a cached latent + a RoPE key

    def __str__(self) -> str:
        return self.value


class Form(str, Enum):
    """The form in which a branch attends: to GQA heads, or (latent layers) to the latent itself
    (``ABSORBED``, MQA-style) or to per-head keys/values rebuilt from it (``EXPANDED``)."""

    GROUPED = "grouped"
    ABSORBED = "absorbed"
    EXPANDED = "expanded"

    def __str__(self) -> str:
        return self.value


# Layer kinds of ``layer_pattern``: which attention branches a layer runs, in this order.
LAYER_KINDS: dict[str, tuple[Branch, ...]] = {
    "F": (Branch.FULL,),
    "N": (Branch.COMPRESSION, Branch.SELECTION, Branch.WINDOW),  # narrowed by ``nsa_branches``
    "L": (Branch.WINDOW,),
    "G": (Branch.COMPRESSION, Branch.SELECTION),
}
SPARSE_BRANCHES = (Branch.COMPRESSION, Branch.SELECTION, Branch.WINDOW)


@dataclass(frozen=True)
class LayerSpec:
    """Everything about one attention layer that follows from the config: the one place the
    layer, its decode cache, ``model_stats`` and the benchmarks read these facts from.

    ``kv_heads`` is the number of key/value heads the layer caches and its selection groups
    share: ``n_kv_heads`` (GQA) or the latent groups (MLA: 1, GLA: ``g_c``); ``group_dim`` is the
    width of one (``head_dim``, or ``latent_dim / groups``). ``forms`` gives the form each
    branch trains in (``Form.GROUPED`` in GQA layers). ``kv_per_branch``: every branch has its
    own key/value projection (NSA layers under ``nsa_kv="per_branch"``, see ``kv_branches``),
    else all branches read one. Geometry fields are the config's.
    """

    kind: str
    branches: tuple[Branch, ...]
    kv: KVSource
    n_heads: int
    head_dim: int
    kv_heads: int
    group_dim: int
    rope_dim: int
    forms: dict[Branch, Form]  # every branch that attends (compression too when selecting)
    q_share: int
    window: int
    compress_block: int
    compress_stride: int
    select_block: int
    top_n: int
    num_local_blocks: int
    kv_per_branch: bool = False

    @property
    def latent(self) -> bool:
        return self.kv is KVSource.LATENT

    @property
    def compresses(self) -> bool:
        """Whether the layer computes compressed tokens: for the compression branch, and for
        selection, whose block importance comes from the compression attention."""
        return Branch.COMPRESSION in self.branches or Branch.SELECTION in self.branches

    @property
    def selects(self) -> bool:
        return Branch.SELECTION in self.branches

    @property
    def scale(self) -> float:
        """Softmax scale of every branch: ``1 / sqrt(head_dim (+ rope_dim for latent layers))``,
        the same in both latent forms."""
        return (self.head_dim + (self.rope_dim if self.latent else 0)) ** -0.5

    @property
    def query_dim(self) -> int:
        """Width of one projected query head: ``head_dim`` (+ ``rope_dim`` for latent layers)."""
        return self.head_dim + (self.rope_dim if self.latent else 0)

    def form(self, branch: Branch | str) -> Form:
        return self.forms[Branch(branch)]

    @property
    def compressed_form(self) -> Form | None:
        """The form of the compression attention (which selection scores blocks from), or None
        when the layer does not compress."""
        return self.form(Branch.COMPRESSION) if self.compresses else None

    @property
    def token_forms(self) -> frozenset[Form]:
        """Forms in which some branch reads per-token keys/values (all but compression)."""
        return frozenset(self.forms[b] for b in self.branches if b is not Branch.COMPRESSION)

    def dims(self, branch: Branch | str) -> tuple[int, int]:
        """``(Dqk, Dv)`` per head of ``branch`` in its training form."""
        form = self.form(branch)
        if form is Form.GROUPED:
            return self.head_dim, self.head_dim
        if form is Form.ABSORBED:
            return self.group_dim + self.rope_dim, self.group_dim
        return self.head_dim + self.rope_dim, self.head_dim

    def attention_heads(self, branch: Branch | str) -> int:
        """Key/value heads a branch's kernel reads: the cached heads (GQA heads, latent groups
        in the absorbed form) or, in the expanded form, one per query head."""
        return self.n_heads if self.form(branch) is Form.EXPANDED else self.kv_heads

    @property
    def kv_branches(self) -> tuple[Branch, ...]:
        """The branches that own a key/value projection (and a decode cache) in a per-branch
        layer, in this order: compression (whenever the layer compresses: selection scores blocks
        with its compressed keys), selection, window. Empty when all branches share one."""
        if not self.kv_per_branch:
            return ()
        owns = {Branch.COMPRESSION: self.compresses, Branch.SELECTION: self.selects,
                Branch.WINDOW: Branch.WINDOW in self.branches}
        return tuple(b for b in SPARSE_BRANCHES if owns[b])

    @property
    def cache_width(self) -> int:
        """Elements cached per token of one key/value source: ``2 * n_kv_heads * head_dim``
        (keys and values) or ``latent_dim + rope_dim`` (the latent is key and value). A
        per-branch layer has one such source per branch of ``kv_branches``."""
        if self.latent:
            return self.kv_heads * self.group_dim + self.rope_dim
        return 2 * self.kv_heads * self.head_dim

    def branch_slots(self, max_len: int) -> dict[Branch, int]:
        """Per-branch layers: raw tokens each branch of ``kv_branches`` keeps of a sequence of
        up to ``max_len``: compression the last ``compress_block`` (what the compressor needs
        to compress the block ending at the newest token), selection all of them, window the
        last ``window``. Empty for a shared layer."""
        keep = {Branch.COMPRESSION: self.compress_block, Branch.SELECTION: max_len,
                Branch.WINDOW: self.window}
        return {b: min(max_len, keep[b]) for b in self.kv_branches}

    def cache_slots(self, max_len: int) -> int:
        """Raw tokens a decode cache keeps of a sequence of up to ``max_len``: all of them for
        full attention and selection, else the last ``window`` (and at least one compression
        block, to compress the block ending at the newest token). A per-branch layer keeps each
        branch's own raw tokens: the sum of :meth:`branch_slots`."""
        if self.kv_per_branch:
            return sum(self.branch_slots(max_len).values())
        if Branch.FULL in self.branches or self.selects:
            return max_len
        keep = max(self.window if Branch.WINDOW in self.branches else 0,
                   self.compress_block if self.compresses else 0)
        return min(max_len, keep)

    def compressed_tokens(self, context: int) -> int:
        """Compressed tokens of a sequence of ``context`` tokens (0 without compression)."""
        return num_compressed(context, self.compress_block, self.compress_stride) \
            if self.compresses else 0

    def kv_elements(self, context: int) -> int:
        """Cache elements of one sequence of ``context`` tokens: raw and compressed tokens,
        ``(cache_slots + compressed_tokens) * cache_width``. For a per-branch NSA layer with all
        three branches, ``T = context``, ``N = compressed_tokens(T)``, width ``2 * Hk * dh``:
        ``(T + min(T, window) + min(T, compress_block) + N) * 2 * Hk * dh`` (selection's raw
        tokens, the window's, the compressor's last block, the compressed tokens)."""
        return (self.cache_slots(context) + self.compressed_tokens(context)) * self.cache_width


@dataclass
class ModelConfig:
    """Architecture of the decoder-only transformer and of its attention layers.

    Layer kinds (letters of ``layer_pattern``, repeated to ``n_layers``):
      ``F`` full causal attention (GQA), ``N`` NSA (the ``nsa_branches``, GQA key/values),
      ``L`` local layer (sliding window; key/values from ``local_kv``),
      ``G`` global layer (compression + selection; key/values from ``global_kv``).
    NSA layers' branches read one key/value projection (``nsa_kv="shared"``) or one each
    (``"per_branch"``, NSA layers only).
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
    nsa_branches: list[str] = field(default_factory=lambda: [b.value for b in SPARSE_BRANCHES])

    # Key/value sources
    n_kv_heads: int = 4
    local_kv: Literal["latent", "grouped"] = "latent"
    global_kv: Literal["latent", "grouped"] = "latent"
    latent_dim: int = 256
    rope_dim: int = 32
    local_latent_groups: int = 1
    global_latent_groups: int = 2
    latent_form: Literal["auto", "absorbed", "expanded"] = "auto"
    # NSA layers: one key/value projection read by all branches ("shared"), or one per branch
    # ("per_branch", the NSA paper's independent keys/values for compression, selection, window)
    nsa_kv: Literal["shared", "per_branch"] = "shared"

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
        bad = sorted(set(self.nsa_branches) - set(SPARSE_BRANCHES))
        need(bool(self.nsa_branches) and not bad, "nsa_branches",
             f"must be a non-empty subset of {[str(b) for b in SPARSE_BRANCHES]}, "
             f"got {self.nsa_branches}")
        need(len(set(self.nsa_branches)) == len(self.nsa_branches), "nsa_branches",
             "lists a branch twice")
        need(self.local_kv in ("latent", "grouped"), "local_kv", "must be 'latent' or 'grouped'")
        need(self.global_kv in ("latent", "grouped"), "global_kv", "must be 'latent' or 'grouped'")
        need(self.latent_form in ("auto", "absorbed", "expanded"), "latent_form",
             "must be 'auto', 'absorbed' or 'expanded'")
        need(self.compress_method in ("mlp", "mean"), "compress_method", "must be 'mlp' or 'mean'")
        need(self.nsa_kv in ("shared", "per_branch"), "nsa_kv",
             f"must be 'shared' or 'per_branch', got {self.nsa_kv!r}")
        if self.nsa_kv == "per_branch":
            others = sorted(set(self.layer_pattern) - {"N", "F"})
            need("N" in self.layer_pattern and not others, "nsa_kv",
                 f"'per_branch' gives each branch of an NSA layer ('N') its own key/value "
                 f"projection; layer_pattern {self.layer_pattern!r} "
                 + (f"has local/global layers {others}, whose branches share one key/value "
                    f"source (a latent in ASA)" if others else "has no NSA layer"))
            need(Branch.COMPRESSION in self.nsa_branches
                 or Branch.SELECTION not in self.nsa_branches, "nsa_kv",
                 "'per_branch' with selection but without the compression branch: the "
                 "compression branch's keys, which score the blocks, would never get a gradient "
                 "(use nsa_kv='shared' for that ablation)")
        need(self.kernel_backend in BACKENDS, "kernel_backend", f"must be one of {BACKENDS}")

        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        for name in ("local_latent_groups", "global_latent_groups"):
            groups = getattr(self, name)
            need(self.n_heads % groups == 0, name,
                 f"n_heads ({self.n_heads}) must be divisible by {name} ({groups})")
            need(self.latent_dim % groups == 0, name,
                 f"latent_dim ({self.latent_dim}) must be divisible by {name} ({groups})")
        specs = [self.layer(kind) for kind in sorted(set(self.layer_pattern))]
        if any(spec.latent for spec in specs):
            need(self.latent_dim <= self.d_model, "latent_dim",
                 f"must be <= d_model ({self.d_model}): the latent compresses the hidden state, "
                 f"got {self.latent_dim}")

        if self.uses_branch(Branch.WINDOW):
            need(self.window < self.seq_len, "window",
                 f"must be < seq_len ({self.seq_len}): a window over the whole sequence is full "
                 f"attention, got {self.window}")
        if any(spec.compresses for spec in specs):
            need(self.compress_block % self.compress_stride == 0, "compress_block",
                 f"must be a multiple of compress_stride ({self.compress_stride}), "
                 f"got {self.compress_block}")
            need(self.select_block % self.compress_stride == 0, "select_block",
                 f"must be a multiple of compress_stride ({self.compress_stride}), "
                 f"got {self.select_block}")
            need(self.seq_len >= self.compress_block, "seq_len",
                 f"must be >= compress_block ({self.compress_block}), got {self.seq_len}")
        if self.uses_branch(Branch.SELECTION):
            need(self.seq_len % self.select_block == 0, "seq_len",
                 f"must be a multiple of select_block ({self.select_block}), got {self.seq_len}")
            if "G" in self.layer_pattern:  # query sharing applies to global layers only
                need(self.select_block % self.q_share == 0, "q_share",
                     f"must divide select_block ({self.select_block}), got {self.q_share}")
            need(self.num_local_blocks >= 1, "num_local_blocks",
                 "must be >= 1 when a layer selects blocks: the query's current block is always "
                 f"selected, got {self.num_local_blocks}")
            need(self.compress_method == "mean" or all(
                Branch.COMPRESSION in spec.branches for spec in specs
                if Branch.SELECTION in spec.branches), "compress_method",
                 "must be 'mean' when a layer selects blocks without the compression branch: "
                 "the compressor MLPs that score the blocks would never get a gradient (they "
                 "would score with random weights), got 'mlp'")
            need(self.top_n >= 1 + self.num_local_blocks, "top_n",
                 f"must be >= 1 + num_local_blocks ({1 + self.num_local_blocks}): the first and "
                 f"the local blocks are always selected")
            blocks = self.seq_len // self.select_block
            need(self.top_n < blocks, "top_n",
                 f"must be < seq_len / select_block ({blocks} selection blocks): selecting "
                 f"{self.top_n} would attend to every block, got {self.top_n}")

    # -- derived quantities ------------------------------------------------------------------
    @property
    def layer_kinds(self) -> list[str]:
        """One letter per layer."""
        return list(self.layer_pattern * (self.n_layers // len(self.layer_pattern)))

    def layer(self, which: int | str) -> LayerSpec:
        """The :class:`LayerSpec` of layer ``which`` (an index) or of a layer kind (a letter)."""
        kind = self.layer_kinds[which] if isinstance(which, int) else which
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {kind!r}: expected one of {''.join(LAYER_KINDS)}")
        if kind == "N":
            branches = tuple(b for b in SPARSE_BRANCHES if b in self.nsa_branches)
        else:
            branches = LAYER_KINDS[kind]
        kv = KVSource({"F": "grouped", "N": "grouped", "L": self.local_kv,
                       "G": self.global_kv}[kind])
        # the compression attention runs whenever the layer selects (block importance)
        attends = set(branches) | ({Branch.COMPRESSION} if Branch.SELECTION in branches else set())
        if kv is KVSource.GROUPED:
            kv_heads, group_dim = self.n_kv_heads, self.head_dim
            forms = {b: Form.GROUPED for b in Branch if b in attends}
        else:
            kv_heads = self.local_latent_groups if kind == "L" else self.global_latent_groups
            group_dim = self.latent_dim // kv_heads
            forms = {b: self.branch_form(b) for b in Branch if b in attends}
        return LayerSpec(
            kind=kind, branches=branches, kv=kv, n_heads=self.n_heads, head_dim=self.head_dim,
            kv_heads=kv_heads, group_dim=group_dim, rope_dim=self.rope_dim, forms=forms,
            q_share=self.q_share if kind == "G" else 1,  # query sharing: global layers only
            window=self.window, compress_block=self.compress_block,
            compress_stride=self.compress_stride, select_block=self.select_block,
            top_n=self.top_n, num_local_blocks=self.num_local_blocks,
            kv_per_branch=kind == "N" and self.nsa_kv == "per_branch")

    @property
    def layers(self) -> list[LayerSpec]:
        """One :class:`LayerSpec` per layer."""
        specs = {kind: self.layer(kind) for kind in set(self.layer_pattern)}
        return [specs[kind] for kind in self.layer_kinds]

    def branch_form(self, branch: Branch | str) -> Form:
        """Form in which a latent layer trains ``branch``: ``latent_form``, or under ``"auto"``
        the faster one measured on an H200 (benchmarks/README.md): absorbed for selection (all
        heads of a latent group read one latent block), expanded for the window and compression
        (narrower per-head keys: 96/64 instead of 288/256 or 160/128)."""
        if self.latent_form != "auto":
            return Form(self.latent_form)
        return Form.ABSORBED if branch == Branch.SELECTION else Form.EXPANDED

    def uses_branch(self, branch: Branch | str) -> bool:
        return any(branch in self.layer(k).branches for k in set(self.layer_pattern))
