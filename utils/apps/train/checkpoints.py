"""The output folder of a training run and its resumable checkpoints.

A run writes RUN_OUTPUTS into its folder ``out``; checkpoints are ``out/checkpoints/ckpt_<step:08d>.pt``, each
written atomically (a kill leaves the previous file or the new one, never half of one) and holding everything a
bit-exact resume needs: weights, optimiser state, the batch sampler's and torch's random states, the step, the
elapsed time, the config, the identities and the metrics history; with an encoder trained jointly with the field
(``--encoder.joint true``) also its weights, optimiser and random states (key "encoder", absent in other checkpoints).
Resume takes the newest checkpoint that reads; damaged newer ones are skipped with a message.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from utils.apps.train.distributed import on_main
from utils.core.atomic import remove_orphan_temps
from utils.core.config import to_dict
from utils.core.locks import FolderLock
from utils.core.torch_files import UnsafeFileError, atomic_torch_save, safe_torch_load

# What a training run writes into --out (a fresh run refuses a folder holding any of them unless told to overwrite).
RUN_OUTPUTS = ("model.pt", "metrics.json", "eval_heldout_views.png", "checkpoints/ckpt_*.pt",
               "tb/events.out.tfevents.*")
CHECKPOINT_KEYS = ("step", "elapsed", "config", "identities", "field", "optimizer", "sampler", "torch_rng")


def run_outputs(out: Path) -> list[Path]:
    """Files of a training run present in the folder ``out`` (see RUN_OUTPUTS)."""
    return sorted(p for pattern in RUN_OUTPUTS for p in out.glob(pattern) if p.is_file())


def claim_output(lock: FolderLock, out: Path, ckpt_dir: Path, resume: bool, overwrite: bool) -> None:
    """Rank 0: lock ``out``; refuse a folder holding another run unless resuming it or told to overwrite."""
    lock.acquire()
    # temporaries of writers killed halfway (kill -9) in an earlier run: orphans now that the folder is ours
    orphans = [p for d in (out, ckpt_dir) for p in remove_orphan_temps(d)]
    if orphans:
        print(f"removed {len(orphans)} temporary file(s) left by an interrupted run in {out}: "
              f"{', '.join(str(p.relative_to(out)) for p in orphans[:4])}{' ...' if len(orphans) > 4 else ''}")
    found = run_outputs(out)
    has_ckpt = any(p.parent == ckpt_dir for p in found)
    # --resume without a checkpoint starts from scratch, as a run killed before its first checkpoint needs (its
    # logs and metrics are replaced); only a finished run's model.pt, written after its last checkpoint, stops it
    if not found or (resume and (has_ckpt or not (out / "model.pt").is_file())):
        return
    if overwrite:
        for p in found:
            p.unlink(missing_ok=True)
        print(f"--overwrite: removed {len(found)} file(s) of the previous run in {out}")
        return
    names = ", ".join(str(p.relative_to(out)) for p in found[:4]) + (" ..." if len(found) > 4 else "")
    if resume:
        raise FileExistsError(f"--resume: {ckpt_dir} holds no checkpoint, but {out} holds the model.pt "
                              f"of a finished run ({names}); pass --overwrite (without --resume) to replace it, "
                              f"or choose another --out")
    raise FileExistsError(f"{out} already holds a training run ({names}); pass --resume to continue it, "
                          f"--overwrite to replace it, or choose another --out")


def checkpoint_state(step: int, elapsed: float, cfg, identities: list[str], field: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, sampler: torch.Generator, history: list[dict],
                     encoder: dict | None = None) -> dict:
    """Everything a bit-exact resume needs (CHECKPOINT_KEYS, plus the CUDA random states and the history);
    ``cfg``: the run's TrainConfig; ``encoder``: the state of an encoder trained jointly with the field
    (utils/apps/train/encoder.py JointEncoder.state_dict; an optional key: checkpoints without it still load)."""
    state = {
        "step": step,
        "elapsed": elapsed,
        "config": to_dict(cfg),
        "identities": identities,
        "field": field.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": history,
    }
    if encoder is not None:
        state["encoder"] = encoder
    return state


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in ``ckpt_dir``, by step."""
    found = []
    for p in ckpt_dir.glob("ckpt_*.pt"):
        m = re.fullmatch(r"ckpt_(\d+)\.pt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def write_checkpoint(state: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """Write ``ckpt_<step>.pt`` atomically, then delete the checkpoints beyond the newest ``keep`` of those at or
    before ``step`` (by step number, not by name: a higher-numbered file this run did not write stays)."""
    path = ckpt_dir / f"ckpt_{step:08d}.pt"
    atomic_torch_save(state, path)
    own = [p for s, p in list_checkpoints(ckpt_dir) if s <= step]
    for p in own[:-keep]:
        p.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's state (weights-only load: no code runs); ValueError when unreadable or incomplete."""
    state = safe_torch_load(path, "training checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of this project (it lacks {missing})")
    return state


def newest_readable(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """Rank 0: the newest checkpoint that reads and its state; damaged newer ones are skipped with a message."""
    ckpts = list_checkpoints(ckpt_dir)
    skipped = []
    for _, path in reversed(ckpts):
        try:
            state = read_checkpoint(path)
        except UnsafeFileError:
            raise  # a payload is not damage: never fall back silently past it
        except (OSError, ValueError) as exc:
            skipped.append(f"{path.name} ({exc})")
            continue
        if skipped:
            print(f"--resume: skipped {len(skipped)} unreadable checkpoint(s), newest first: {'; '.join(skipped)}; "
                  f"resuming from {path.name} instead (the damaged file stays until a new checkpoint of its step "
                  f"replaces it)")
        return path, state
    if ckpts:
        raise ValueError(f"--resume: none of the {len(ckpts)} checkpoints in {ckpt_dir} can be read: "
                         f"{'; '.join(skipped)}")
    return None


def choose_checkpoint(ckpt_dir: Path, is_main: bool, ddp: bool) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its state, the same on every rank (rank 0 chooses); None: none there."""
    found = None

    def choose() -> str | None:
        nonlocal found
        found = newest_readable(ckpt_dir)
        return None if found is None else str(found[0])

    chosen = on_main(choose, is_main, ddp)
    if chosen is None:
        return None
    path = Path(chosen)
    return path, found[1] if found is not None else read_checkpoint(path)


def check_resumable(path: Path, state: dict, steps: int, identities: list[str], model_config: dict) -> None:
    """ValueError unless checkpoint ``state`` (read from ``path``) can continue a run of ``steps`` steps on
    ``identities`` with the model config ``model_config`` (a dict, as in the checkpoint)."""
    if int(state["step"]) > steps:
        raise ValueError(f"--resume: {path} is at step {int(state['step'])}, past --steps {steps}; pass "
                         f"--steps {int(state['step'])} or more to continue it (or --overwrite to start again)")
    if state["identities"] != identities:
        raise ValueError(
            f"{path} was trained on identities {state['identities'][:5]}... but the data now gives "
            f"{identities[:5]}...: use the same data options to resume"
        )
    if state["config"]["model"] != model_config:
        raise ValueError(f"{path} was made with another model config; resume with the same --config/model keys")


def restore_checkpoint(state: dict, field: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       sampler: torch.Generator) -> None:
    """Load a checkpoint's weights, optimiser state and random states (sampler, torch, CUDA) in place."""
    field.load_state_dict(state["field"])
    optimizer.load_state_dict(state["optimizer"])
    sampler.set_state(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
