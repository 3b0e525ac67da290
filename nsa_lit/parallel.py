"""How a :class:`~nsa_lit.model.Transformer` is prepared for training: activation checkpointing,
``torch.compile`` and FSDP2 sharding, in that order, in one place (torchtitan's llama3
``parallelize``). :class:`~nsa_lit.lit_module.LanguageModel` calls :func:`parallelize` and then
:func:`materialize` from ``configure_model``.

Order, per transformer block: activation checkpointing wraps the block, ``torch.compile``
compiles the (wrapped) block in place, ``fully_shard`` makes it one FSDP2 unit (one all-gather
before its forward and backward, one reduce-scatter of its gradients); then ``fully_shard`` on
the root takes what is left (embedding, final norm, LM head). Sharding happens only when the
strategy provides a device mesh (Lightning's ``ModelParallelStrategy``, or
:class:`FSDP2Strategy`); under DDP or on one device the model is left whole.

Every step is idempotent: Lightning calls ``configure_model`` once per ``fit`` / ``validate``
and again in ``load_from_checkpoint``.

A model built on the meta device (by the CLI under a model-parallel strategy, or under
``trainer.init_module(empty_init=True)``) is sharded while still on meta, so no process ever
holds the whole model, and then :func:`materialize` allocates each process's shards on its
device and runs :meth:`Transformer.init_weights` on them.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from nsa_lit.model import Transformer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class FSDPConfig:
    """FSDP2 settings, used only under a model-parallel strategy (``model.fsdp.*``).

    ``param_dtype``: the dtype parameters are all-gathered in and the blocks compute with (the
    sharded fp32 parameters, gradients and optimiser state stay fp32): ``bfloat16`` on GPUs,
    ``float32`` on CPUs (tests). ``reduce_dtype``: the dtype gradients are reduce-scattered
    in; ``float32`` sums the processes' bf16 gradients without bf16 rounding.
    ``reshard_after_forward``: free each block's gathered parameters after its forward and
    gather them again for its backward (less memory, one more all-gather per block and step);
    ``false`` keeps them until the backward (faster on one node, more memory)."""

    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value not in DTYPES:
                raise ValueError(
                    f"model.fsdp.{name} must be one of {sorted(DTYPES)}, got {value!r}")
        if not isinstance(self.reshard_after_forward, bool):
            raise ValueError("model.fsdp.reshard_after_forward must be true or false, got "
                             f"{self.reshard_after_forward!r}")

    def mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # float32 parameters need no cast at all (None: FSDP2 keeps them as they are)
        param = DTYPES[self.param_dtype]
        return MixedPrecisionPolicy(param_dtype=None if param == torch.float32 else param,
                                    reduce_dtype=DTYPES[self.reduce_dtype])


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2 data parallelism: every process holds
    one shard, ``data_parallel_size = num_nodes x devices`` (read from the trainer, so
    ``--trainer.num_nodes N`` is all a multi-node run needs) and ``tensor_parallel_size = 1``
    (``ModelParallelStrategy``'s own ``"auto"`` puts tensor parallelism inside a node, which
    this model does not implement). Selected by ``trainer.strategy: fsdp2``. The other
    arguments are ``ModelParallelStrategy``'s: ``save_distributed_checkpoint`` (default true:
    each process writes its shard, the checkpoint is a directory; false: rank 0 gathers and
    writes one file).

    Sharded saves are atomic: every process writes into ``<path>.tmp`` (a leftover one from a
    killed save is removed first), and once all have succeeded rank 0 moves the previous
    ``<path>`` aside to ``<path>.old``, renames ``<path>.tmp`` to ``<path>`` and deletes the old
    one. A kill or a failure on any process during the save leaves ``<path>`` as it was; a
    failure raises :class:`~nsa_lit.checkpoint.CheckpointSaveError` on every process.
    (``--ckpt_path last`` takes ``last*.ckpt``, never a ``.tmp``; :class:`~nsa_lit.checkpoint.RunCheckpoint` takes
    ``last.ckpt.old`` only when a kill between the two renames left no ``last.ckpt``, and the
    next save puts it back first.)"""

    def __init__(self, data_parallel_size: Literal["auto"] | int = "auto",
                 save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """Lightning's, but a single-file checkpoint of another strategy (the plain one: its
        optimiser state keyed by integer ids, in the optimiser's parameter-group order) is
        rekeyed by this run's optimiser's own parameter groups. Lightning would number the
        parameters in ``module.parameters()`` order, which this model's two weight-decay groups
        do not follow: the states would land on the wrong parameters (a shape error, or worse)."""
        from lightning.fabric.strategies import model_parallel as fabric_model_parallel

        orders = iter([optimizer_parameter_names(self.model, optimizer)
                       for optimizer in self.optimizers])
        lightning_rekey = fabric_model_parallel._rekey_optimizer_state_if_needed

        def rekey(state: dict, module: nn.Module) -> dict:
            names = next(orders)
            ids = list(state["state"]) + [p for g in state["param_groups"] for p in g["params"]]
            if not ids or not isinstance(ids[0], int):
                return lightning_rekey(state, module)
            return {"state": {names[i]: s for i, s in state["state"].items()},
                    "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                     for g in state["param_groups"]]}

        fabric_model_parallel._rekey_optimizer_state_if_needed = rekey
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            fabric_model_parallel._rekey_optimizer_state_if_needed = lightning_rekey

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

        if (not self._save_distributed_checkpoint or storage_options is not None
                or not _is_local_file_protocol(filepath)):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from nsa_lit.checkpoint import CheckpointSaveError, _fsync_dir

        path = os.fspath(self.broadcast(os.fspath(filepath)))
        tmp, old = path + ".tmp", path + ".old"
        error: BaseException | None = None
        try:
            if self.global_rank == 0:
                _remove(tmp)  # a killed save's leftovers
                if os.path.lexists(old) and not os.path.lexists(path):
                    os.rename(old, path)  # killed between the two renames: the previous one
        except Exception as err:  # noqa: BLE001
            error = err
        # all processes agree before the (collective) save, which none may enter alone
        if self.reduce_boolean_decision(error is None, all=True):
            try:
                super().save_checkpoint(checkpoint, tmp)
            except Exception as err:  # noqa: BLE001  (every process must reach the vote)
                error = err
        if self.reduce_boolean_decision(error is None, all=True) and self.global_rank == 0:
            try:  # all shards and meta.pt are written: swap the new directory in
                _remove(old)
                if os.path.lexists(path):
                    os.rename(path, old)
                os.rename(tmp, path)
                _fsync_dir(os.path.dirname(os.path.abspath(path)))
                _remove(old)
            except Exception as err:  # noqa: BLE001
                error = err
        ok = self.reduce_boolean_decision(error is None, all=True)
        if ok:
            return
        if self.global_rank == 0:
            with contextlib.suppress(OSError):
                _remove(tmp)
            if not os.path.lexists(path) and os.path.lexists(old):
                with contextlib.suppress(OSError):
                    os.rename(old, path)  # the swap failed halfway: put the old one back
        what = (f"{type(error).__name__}: {error}" if error is not None
                else "it failed on another process")
        kept = ("the previous checkpoint there is unchanged" if os.path.lexists(path)
                else "no checkpoint was written there")
        raise CheckpointSaveError(
            f"saving sharded checkpoint {path} failed ({what}); {kept}") from error


def optimizer_parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names (in ``module``) of ``optimizer``'s parameters, in its parameter-group order:
    the order of a plain ``state_dict()``'s integer ids."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _remove(path: str) -> None:
    """Delete a file or a directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ``trainer.strategy: fsdp2`` (YAML / CLI) for FSDP2Strategy()
StrategyRegistry.register(
    "fsdp2", FSDP2Strategy, override=True,
    description="FSDP2 over all processes (nsa_lit.parallel.FSDP2Strategy)")


def data_parallel_mesh(mesh):
    """The data-parallel dimension of Lightning's ``(data_parallel, tensor_parallel)`` mesh (or
    a 1-D mesh as it is); refused when it asks for tensor parallelism."""
    if mesh is None or mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()}: this model has no tensor "
            "parallelism; set the strategy's tensor_parallel_size: 1 and data_parallel_size: "
            "num_nodes x devices (or use nsa_lit.parallel.FSDP2Strategy)")
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def parallelize(model: Transformer, mesh=None, *, compile: bool = False,
                activation_checkpointing: bool = False, fsdp: FSDPConfig | None = None
                ) -> Transformer:
    """Apply, in place and at most once each: activation checkpointing of every block, then
    ``torch.compile`` of every block (:meth:`Transformer.compile_blocks`), then -- when
    ``mesh`` (a device mesh, e.g. ``LightningModule.device_mesh``) is given -- FSDP2's
    ``fully_shard`` on every block and on the root, with ``fsdp``'s mixed precision."""
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        model.compile_blocks()
    if mesh is not None:
        shard(model, data_parallel_mesh(mesh), fsdp or FSDPConfig())
    return model


def checkpoint_blocks(model: Transformer) -> None:
    """Recompute each block's activations in its backward instead of keeping them (torch's
    non-reentrant checkpoint; the block is wrapped, its state-dict keys are unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper, checkpoint_wrapper)

    for i, block in enumerate(model.blocks):
        if isinstance(block, CheckpointWrapper):
            continue
        if block._compiled_call_impl is not None:
            raise RuntimeError("activation checkpointing must wrap a block before torch.compile")
        # no dropout or other randomness in a block: no RNG state to save and restore
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def shard(model: Transformer, mesh, fsdp: FSDPConfig) -> None:
    """``fully_shard`` every block, then the root (embedding, final norm, LM head). The loss
    reads the root's hidden states through ``Transformer.hidden`` and the LM head's weight
    (:mod:`nsa_lit.loss`), so ``hidden`` is registered as a forward method: it gathers the
    root's parameters like ``forward``, and the root, as FSDP2's root, keeps them gathered
    until its backward."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return
    kwargs = dict(mesh=mesh, mp_policy=fsdp.mp_policy())
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=fsdp.reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "hidden")


def materialize(model: nn.Module, device: torch.device | str) -> bool:
    """If any parameter or buffer of ``model`` is on the meta device: allocate all of them on
    ``device`` (only this process's shards when sharded) and initialise them with
    ``model.init_weights()``. True if it did."""
    if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        return False
    model.to_empty(device=device)
    model.init_weights()
    return True
