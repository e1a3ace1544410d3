"""The model and subspace a benchmark runs: the flags every script takes (`add_common_arguments`) and their
resolution into something loadable (`prepare`: the shipped subspace, a given one, or a random Proj_b; the tiny
random model of --quick).

Every script takes the same core flags:
    --backbone smollm2        the PLM (any transformers causal / seq2seq LM name or path works)
    --subspace DIR|random     default: the shipped service/artifacts/smollm2-bigbench when present
    --device, --dtype         default: CUDA when available, float32 (the service's default)
    --quick                   a tiny random model and a random subspace built on the fly, small counts: a smoke
                              run in seconds (the figures mean nothing, the mechanics are all exercised)
    --write-docs [PATH]       write the table into docs/benchmarks.md (or PATH)
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import DOCS

QUICK_SHAPE = (4, 8, 16)  # n, d_I, d_I' of the random subspace of --quick
PAPER_SHAPE = (100, 250, 768)  # n, d_I, d_I' of the paper's official code: the default random subspace

# ------------------------------------------------------------------------------------------------ arguments
def add_common_arguments(parser: argparse.ArgumentParser, *, random_subspace: bool = True) -> None:
    """The flags every benchmark takes. `random_subspace`: whether a random Proj_b is acceptable (it is for
    timing a forward pass; it is not for training to a dev score)."""
    parser.add_argument("--backbone", default="smollm2",
                        help="the PLM: 'smollm2' (default) or a transformers model name or local path")
    sub_help = ("subspace artifact directory (written by `ipt msf`); default: the shipped "
                "service/artifacts/smollm2-bigbench")
    if random_subspace:
        sub_help += (" when present, else 'random': a random Proj_b of shape --n-prompt/--d-intrinsic/--d-hidden "
                     "(timings depend on the shape only, not on the trained weights)")
    parser.add_argument("--subspace", default=None, help=sub_help)
    if random_subspace:
        parser.add_argument("--n-prompt", type=int, default=PAPER_SHAPE[0], help="random subspace: prompt length n")
        parser.add_argument("--d-intrinsic", type=int, default=PAPER_SHAPE[1], help="random subspace: d_I")
        parser.add_argument("--d-hidden", type=int, default=PAPER_SHAPE[2], help="random subspace: d_I'")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when available, else CPU)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32, as the service)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, every core)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a tiny random model, a random subspace, small counts (seconds; the figures "
                             "mean nothing)")
    parser.add_argument("--write-docs", nargs="?", const=str(DOCS), default=None, metavar="PATH",
                        help="also write the table into docs/benchmarks.md (or PATH), replacing this script's earlier "
                             "section for the same device kind")


# ----------------------------------------------------------------------------------------- model, subspace
@dataclass
class Setup:
    """The model and subspace a benchmark runs, and a scratch directory removed at the end."""

    backbone: str  # name or path, as Backbone.load and Settings.backbone take it
    subspace: Path  # an artifact directory
    subspace_note: str  # how it was chosen, for the report
    device: str | None
    dtype: str
    workdir: Path
    quick: bool
    threads: int | None = None  # torch CPU threads asked for (None: torch's default)

    @property
    def label(self) -> str:
        return "tiny random Llama (--quick)" if self.quick else self.backbone


def prepare(args: argparse.Namespace, stack: ExitStack, *, random_subspace: bool = True) -> Setup:
    """Resolve --backbone/--subspace into something loadable; build the tiny model and a random subspace when asked.

    Raises SystemExit with a clear message when the subspace is missing and a random one would not do."""
    from service.settings import DEFAULT_SUBSPACE

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ipt-bench-")))
    backbone = args.backbone
    requested = args.subspace
    if args.quick:
        from ipt_engine.testing import save_tiny

        backbone = str(save_tiny("llama", workdir / "tiny-llama"))
        requested = requested or "random"
    if requested is None:
        if backbone == "smollm2" and (DEFAULT_SUBSPACE / "subspace.json").is_file():
            requested = str(DEFAULT_SUBSPACE)
        elif random_subspace:
            requested = "random"
        else:
            raise SystemExit(
                f"no subspace: the shipped {DEFAULT_SUBSPACE} is missing from this installation "
                f"(or --backbone is not smollm2); pass --subspace DIR, a directory written by `ipt msf` for this "
                f"backbone (this benchmark trains to a dev score, so a random subspace would not do)")
    if requested == "random":
        if not random_subspace and not args.quick:
            raise SystemExit("this benchmark trains to a dev score: give a trained subspace, not 'random'")
        shape = QUICK_SHAPE if args.quick else (args.n_prompt, args.d_intrinsic, args.d_hidden)
        path = build_random_subspace(backbone, workdir / "random-subspace", shape, args.device, args.dtype)
        why = "random Proj_b" + (", the shipped subspace is absent" if args.subspace is None and not args.quick else "")
        note = f"{why} (n={shape[0]}, d_I={shape[1]}, d_I'={shape[2]})"
        return Setup(backbone, path, note, args.device, args.dtype, workdir, args.quick, args.threads)
    path = Path(requested)
    if not (path / "subspace.json").is_file():
        raise SystemExit(f"no subspace artifact at {path} (subspace.json missing): pass --subspace DIR, a directory "
                         f"written by `ipt msf`")
    return Setup(backbone, path, str(path), args.device, args.dtype, workdir, args.quick, args.threads)


def build_random_subspace(backbone: str, out: Path, shape: tuple[int, int, int], device: str | None,
                          dtype: str) -> Path:
    """A randomly initialised Proj_b saved as an artifact for `backbone` (fingerprinted with its embeddings)."""
    from ipt_engine.backbone import Backbone
    from ipt_engine.subspace import IntrinsicSubspace, SubspaceConfig
    from ipt_engine.subspace_artifact import save_artifact

    bb = Backbone.load(backbone, device=device, dtype=dtype)
    torch.manual_seed(0)
    sub = IntrinsicSubspace(SubspaceConfig(shape[0], bb.hidden_size, shape[1], shape[2]))
    save_artifact(out, sub, bb.backbone_id, bb.input_embeddings, provenance={"benchmark": "random Proj_b"})
    del bb
    return out


def subspace_shape(runtime: Any) -> str:
    c = runtime.subspace.config
    return f"n={c.n_prompt}, d_I={c.d_intrinsic}, d_I'={c.d_hidden}"
