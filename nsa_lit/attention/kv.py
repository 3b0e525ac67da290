"""Key/value sources of an attention layer: grouped heads (GQA), grouped heads per branch (NSA
with per-branch key/values) or a shared latent (MLA/GLA)."""
from __future__ import annotations

import torch
from torch import nn

from nsa_lit.config import Branch, ModelConfig
from nsa_lit.rope import Rotary


class GroupedKV(nn.Module):
    """GQA: ``n_kv_heads`` key/value heads of width ``head_dim``; RoPE on the whole key.

    Cache per token: ``2 * n_kv_heads * head_dim``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_kv_heads, self.head_dim = cfg.n_kv_heads, cfg.head_dim
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)

    def forward(self, x: torch.Tensor, rope: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, T, d_model)`` -> rotated ``k`` and ``v``, each ``(B, T, n_kv_heads, head_dim)``."""
        return self.finish(self.wk(x), self.wv(x), rope=rope)

    def projections(self) -> list[nn.Linear]:
        """The projections of the layer input :meth:`finish` takes, in its order."""
        return [self.wk, self.wv]

    def finish(self, k: torch.Tensor, v: torch.Tensor, *, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """``wk(x), wv(x)`` ``(B, T, n_kv_heads * head_dim)`` -> what :meth:`forward` returns."""
        B, T, _ = k.shape
        k = rope(k.view(B, T, self.n_kv_heads, self.head_dim))
        return k, v.view(B, T, self.n_kv_heads, self.head_dim)


class LatentKV(nn.Module):
    """MLA (``groups=1``) or GLA (``groups>1``) key/value latent.

    Caches ``c = RMSNorm(W_dkv x)`` of width ``latent_dim``, split into ``groups`` latent heads
    of width ``latent_dim / groups`` (each normalised on its own), plus one RoPE key ``k_R`` of
    width ``rope_dim`` shared by all heads. Query head ``h`` belongs to group
    ``h // (n_heads / groups)`` and has key ``[W_uk[h] c_g ; k_R]`` and value ``W_uv[h] c_g``.
    Cache per token: ``latent_dim + rope_dim``.
    """

    def __init__(self, cfg: ModelConfig, groups: int):
        super().__init__()
        self.groups = groups
        self.group_dim = cfg.latent_dim // groups
        self.rope_dim = cfg.rope_dim
        self.norm_eps, self.init_std = cfg.norm_eps, cfg.init_std
        self.w_dkv = nn.Linear(cfg.d_model, cfg.latent_dim, bias=False)
        self.latent_norm = nn.Parameter(torch.empty(groups, self.group_dim))
        self.w_kr = nn.Linear(cfg.d_model, cfg.rope_dim, bias=False)
        self.w_uk = nn.Parameter(torch.empty(cfg.n_heads, cfg.head_dim, self.group_dim))
        self.w_uv = nn.Parameter(torch.empty(cfg.n_heads, cfg.head_dim, self.group_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """This module's own parameters (the ``nn.Linear`` children are the model's to set):
        latent norm weights 1, up-projections ``W_uk``, ``W_uv`` Normal(0, init_std)."""
        nn.init.ones_(self.latent_norm)
        nn.init.normal_(self.w_uk, std=self.init_std)
        nn.init.normal_(self.w_uv, std=self.init_std)

    def forward(self, x: torch.Tensor, rope: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, T, d_model)`` -> latent ``c (B, T, groups, group_dim)`` and rotated
        ``k_r (B, T, 1, rope_dim)``."""
        return self.finish(self.w_dkv(x), self.w_kr(x), rope=rope)

    def projections(self) -> list[nn.Linear]:
        """The projections of the layer input :meth:`finish` takes, in its order."""
        return [self.w_dkv, self.w_kr]

    def finish(self, c: torch.Tensor, k_r: torch.Tensor, *, rope
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``w_dkv(x) (B, T, latent_dim)``, ``w_kr(x) (B, T, rope_dim)`` -> what :meth:`forward`
        returns."""
        B, T, _ = c.shape
        c = c.view(B, T, self.groups, self.group_dim)
        c = c * torch.rsqrt(c.float().pow(2).mean(-1, keepdim=True) + self.norm_eps).to(c.dtype)
        c = c * self.latent_norm.to(c.dtype)
        return c, rope(k_r.view(B, T, 1, self.rope_dim))

    def _up(self, c: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``weight[h] c_{g(h)}`` for every head, without copying the latent per head:
        ``(B, S, groups, group_dim)`` -> ``(B, S, n_heads, head_dim)``."""
        B, S = c.shape[:2]
        H, dh, dc = weight.shape
        w = weight.to(c.dtype).view(self.groups, H // self.groups, dh, dc)
        return torch.einsum("bsgc,ghdc->bsghd", c, w).reshape(B, S, H, dh)

    def up_keys(self, c: torch.Tensor) -> torch.Tensor:
        """Per-head content keys ``W_uk[h] c_g``: ``(B, S, n_heads, head_dim)``."""
        return self._up(c, self.w_uk)

    def up_values(self, c: torch.Tensor) -> torch.Tensor:
        """Per-head values ``W_uv[h] c_g``: ``(B, S, n_heads, head_dim)``."""
        return self._up(c, self.w_uv)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """``W_uk[h]^T q_h``: ``(B, T, n_heads, head_dim)`` -> ``(B, T, n_heads, group_dim)``,
        so that ``absorb_query(q) . c_g == q . W_uk[h] c_g``."""
        return torch.einsum("bthd,hdc->bthc", q_nope, self.w_uk.to(q_nope.dtype))

    def expand_output(self, o_latent: torch.Tensor) -> torch.Tensor:
        """``W_uv[h] o_h``: attention output in latent space -> ``(B, T, n_heads, head_dim)``."""
        return torch.einsum("bthc,hdc->bthd", o_latent, self.w_uv.to(o_latent.dtype))


class BranchKV(nn.Module):
    """NSA with independent key/values per branch (``nsa_kv="per_branch"``, as in the NSA
    paper): one :class:`GroupedKV` per branch of ``branches`` (``LayerSpec.kv_branches``), so
    that no branch shares a key/value projection with another. The compression branch's keys
    and values feed its compressors (and, through the compressed keys, block selection).

    Cache per token: ``2 * n_kv_heads * head_dim`` per branch, for the tokens that branch keeps
    (``LayerSpec.branch_slots``).
    """

    def __init__(self, cfg: ModelConfig, branches: tuple[Branch, ...]):
        super().__init__()
        if not branches:
            raise ValueError("BranchKV needs at least one branch")
        self.n_kv_heads, self.head_dim = cfg.n_kv_heads, cfg.head_dim
        self.heads = nn.ModuleDict({str(b): GroupedKV(cfg) for b in branches})
        self.branches = tuple(branches)

    def forward(self, x: torch.Tensor, rope: Rotary) -> dict[Branch, tuple[torch.Tensor, torch.Tensor]]:
        """``x (B, T, d_model)`` -> ``{branch: (k, v)}``, each ``(B, T, n_kv_heads, head_dim)``
        (keys rotated)."""
        return {b: self.heads[str(b)](x, rope) for b in self.branches}

    def projections(self) -> list[nn.Linear]:
        """The projections of the layer input :meth:`finish` takes, in its order."""
        return [lin for b in self.branches for lin in self.heads[str(b)].projections()]

    def finish(self, *raw: torch.Tensor, rope) -> dict[Branch, tuple[torch.Tensor, torch.Tensor]]:
        """The outputs of :meth:`projections` -> what :meth:`forward` returns."""
        return {b: self.heads[str(b)].finish(raw[2 * i], raw[2 * i + 1], rope=rope)
                for i, b in enumerate(self.branches)}
