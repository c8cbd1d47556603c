"""granet in the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GraNetCallback("rigl")])``.

Needs the ``granet[hf]`` extra (transformers, accelerate). The callback builds the sparsifier
when training begins, on the Trainer's model and optimizer (the sparsifier hooks the torch
optimizer inside accelerate's wrapper, so a step that accelerate skips on an fp16 overflow is
not counted), with ``total_steps`` the Trainer's ``max_steps``. It writes the sparsifier's state
into every ``checkpoint-N`` folder with a SHA-256 of its contents and reads it back, checked,
when ``trainer.train(resume_from_checkpoint=...)`` resumes (a damaged state is refused; one saved
before granet had checksums loads with a warning). Under FSDP2 (accelerate's ``fsdp_version: 2``)
the sparsifier is built on the sharded model, and each rank saves the shards of its masks (and
other sharded tensors) with ``torch.distributed.checkpoint`` into ``checkpoint-N/granet_sparsifier``
(the rest, checksummed, in the state file); they are read back resharded to the resumed run's
ranks. When training ends the sparsifier lets go of the model, whose weights keep their zeros: it
may be trained again, with a new callback. It adds its scalars (``granet/sparsity``,
``granet/itop_rate``, ``granet/pruned``, ``granet/dropped``, ``granet/regrown``) to the
Trainer's training logs, which its reporters (TensorBoard, W&B, ...) then see.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from granet.checksum import checked, with_checksum
from granet.integrations.attach import SparsifierHolder, split_sharded
from granet.shards import is_dtensor

__all__ = ["STATE_DIR", "STATE_FILE", "GraNetCallback"]

STATE_FILE = "granet_sparsifier.pt"
STATE_DIR = "granet_sparsifier"  # an FSDP2 run's sharded tensors (torch.distributed.checkpoint)
STATE_FORMAT = 2  # 2: a SHA-256 of the contents (1, without a format field: none)


class GraNetCallback(SparsifierHolder, TrainerCallback):
    """Sparse training with ``method`` (a name of ``granet.METHODS``) in a ``Trainer``:
    ``GraNetCallback(method="granet", **sparsifier_kwargs)``.

    ``sparsifier_kwargs`` are those of the method's class (``sparsity``, ``update_every``,
    ``include`` ...; ``total_steps`` defaults to the Trainer's ``max_steps``). The sparsifier is
    ``self.sparsifier`` once training has begun.
    """

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Build the sparsifier on the Trainer's model and optimizer, or resume it from the
        checkpoint the Trainer resumes from (a resumed run without one is refused)."""
        self._log_first()
        path, saved = self._saved_state(args, state) if state.global_step > 0 else (None, None)
        folder = os.path.join(os.path.dirname(path), STATE_DIR) if path else None
        self._attach(model, optimizer, state.max_steps, saved, path, _reader(folder))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Detach the sparsifier (the model keeps its zeros), so that the model may be trained
        again, by another Trainer with a new callback."""
        self._detach()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Save the sparsifier state into the ``checkpoint-N`` folder the Trainer just wrote
        (under FSDP2 every rank its shards)."""
        sp = self.sparsifier
        if sp is None or not (state.is_world_process_zero or _sharded(sp)):
            return
        folder = _checkpoint(args, state)
        if not os.path.isdir(folder):
            warnings.warn(
                f"granet: no checkpoint folder {folder}; the sparsifier state was not saved and "
                "this checkpoint cannot be resumed with GraNetCallback",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        rest, shards = split_sharded(self.sparsifier.state_dict())
        if shards:
            import torch.distributed.checkpoint as dcp

            dcp.save(shards, checkpoint_id=os.path.join(folder, STATE_DIR))
            if not state.is_world_process_zero:
                return
        saved = {"format": STATE_FORMAT, "global_step": state.global_step, "sparsifier": rest}
        torch.save(with_checksum(saved), os.path.join(folder, STATE_FILE))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the ``granet/`` scalars to the training logs (and to their ``log_history``
        record), not to evaluation logs."""
        if self._scalars is None or logs is None or any(k.startswith("eval_") for k in logs):
            return
        values = self._scalars()
        last = state.log_history[-1] if state.log_history else {}
        if all(last.get(k) == v for k, v in logs.items()):  # the record of these logs
            last.update(values)
        logs.update(values)

    def _log_first(self) -> None:
        """Move this callback to the front of the Trainer's callbacks, so that the scalars it adds
        to the logs reach the reporters (added before user callbacks) in the same call."""
        caller = _caller_locals(CallbackHandler)
        callbacks = caller["self"].callbacks if caller else []
        if self in callbacks and callbacks[0] is not self:
            # the handler is iterating this list: moving this entry to the front from index i
            # leaves the entries after i where they are, so none is skipped or called twice
            callbacks.remove(self)
            callbacks.insert(0, self)

    def _saved_state(
        self, args: TrainingArguments, state: TrainerState
    ) -> tuple[str, dict[str, Any]]:
        """The state file of the checkpoint the Trainer resumes from and its sparsifier state,
        checksum verified."""
        caller = _caller_locals(Trainer)
        folder = (caller or {}).get("resume_from_checkpoint") or _checkpoint(args, state)
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"resume_from_checkpoint: {folder} holds no {STATE_FILE}, so it was not saved "
                "with GraNetCallback; to start sparse training from its weights, load them and "
                "train without resume_from_checkpoint"
            )
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: cannot read it (truncated, or not one): {reason}") from None
        fields = ("global_step", "sparsifier")
        saved = checked(saved, path, ("format", *fields), "sparsifier state", legacy=fields)
        if saved.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise ValueError(
                f"{path} has format {saved['format']!r}; this granet reads {STATE_FORMAT}"
            )
        step = saved["global_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step != state.global_step:
            raise ValueError(
                f"{path} was saved at step {step!r}, but the Trainer resumes at "
                f"step {state.global_step}"
            )
        return path, saved["sparsifier"]


def _sharded(sparsifier: Any) -> bool:
    """Whether ``sparsifier`` holds weights sharded by ``fully_shard`` (FSDP2)."""
    return any(is_dtensor(p) for p in sparsifier.params)


def _reader(folder: str | None) -> Any:
    """What reads the sharded tensors of a sparsifier state from ``folder`` into a template."""

    def read(template: dict[str, torch.Tensor]) -> None:
        import torch.distributed.checkpoint as dcp

        if folder is None or not os.path.isdir(folder):
            raise ValueError(f"{folder} is missing: it holds the sparsifier's sharded masks")
        try:
            dcp.load(template, checkpoint_id=folder)
        except Exception as e:  # dcp raises its own errors for missing or damaged files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{folder}: cannot read the sparsifier's shards: {reason}") from None

    return read


def _checkpoint(args: TrainingArguments, state: TrainerState) -> str:
    """The folder the Trainer saves the checkpoint of this step in (outside a hyperparameter
    search, whose trials have folders of their own)."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _caller_locals(kind: type) -> dict[str, Any] | None:
    """The local variables of the nearest caller that is a method of a ``kind`` object. The
    Trainer hands its callbacks neither its callback handler nor the checkpoint it resumes from,
    so they are read where it called the callback from; ``None`` if no caller is one."""
    frame = sys._getframe(1)
    try:
        while frame is not None:
            if isinstance(frame.f_locals.get("self"), kind):
                return dict(frame.f_locals)
            frame = frame.f_back
        return None
    finally:
        del frame
