"""The experiment pipeline end to end on a fake BIG-bench pool and a tiny backbone: every stage runs,
a rerun resumes from the run directory, and the report has every section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ipt_engine.data.pool import TaskPool, prepare_pool, texts_of
from ipt_engine.data.splits import make_splits, save_splits
from ipt_engine.experiments.ablations import run_levers
from ipt_engine.experiments.config import ExperimentConfig, StageSettings, load_config
from ipt_engine.experiments.export import export_artifact
from ipt_engine.experiments.pipeline import (
    RANDOM_SUBSPACE_SEED,
    ExperimentRun,
    cap_per_family,
    random_proj_b,
    run_experiment,
    trivial_score,
)
from ipt_engine.experiments.report import copy_summaries, write_report
from ipt_engine.experiments.selection import chosen_d
from ipt_engine.metrics import MetricName
from ipt_engine.named_tensors import load_chunks, load_named
from ipt_engine.subspace_artifact import VECTORS_FILE, load_artifact
from ipt_engine.tasks import Example, Task, TaskKind
from ipt_engine.training import STOPPED_BY_REQUEST
from tests.conftest import make_task
from tests.engine.data.fixtures import write_fake_sdist


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exp_pool")
    prepare_pool(write_fake_sdist(root / "bigbench-1.0.0.tar.gz"), root / "pool")
    save_splits(make_splits(TaskPool(root / "pool"), seed=0, test_fraction=0.4), root / "pool" / "splits")
    return root / "pool"


def _config(backbone: str) -> ExperimentConfig:
    fast = {"learning_rate": 0.1, "max_steps": 2, "batch_size": 2, "eval_every": 1, "patience": 2}
    return ExperimentConfig(name="tiny", backbone=backbone, stability_seeds=[0, 1], k_per_class=2, k_other=3,
                            max_test=4, max_new_tokens=3, n_prompt=2, d_intrinsic=[2, 3], d_hidden=8,
                            tasks_per_run=2, pt=StageSettings(**fast),
                            msf=StageSettings(**{**fast, "learning_rate": 0.01}), ist=StageSettings(**fast))


def test_run_resume_and_report(tmp_path: Path, pool_dir: Path, tiny_model_dirs: dict) -> None:
    cfg = _config(str(tiny_model_dirs["llama"]))
    run_dir = tmp_path / "run"
    summary = run_experiment(cfg, run_dir, pool_dir, command="ipt experiment run tiny")
    assert len(summary["train_tasks"]) == 3 and len(summary["test_tasks"]) == 2
    for d in ("2", "3"):
        entry = summary["per_d"][d]
        assert set(entry["unseen_tasks"]) == set(summary["test_tasks"])
        assert set(entry["seen_unseen_data"]) == set(summary["train_tasks"])
        assert set(entry["recon"]) == set(summary["train_tasks"])
        assert (run_dir / "msf" / f"dI{d}" / "subspace.json").is_file()
    assert set(summary["stability"]["per_task"]) == set(summary["test_tasks"])
    # d_I is chosen on dev by the one rule, and the stability runs use it
    assert summary["best_d"] == summary["d_choice"]["d"] == chosen_d(summary) == summary["stability"]["d_intrinsic"]
    assert summary["stability"]["std_ddof"] == 1
    # the controls: IST in a random Proj_b for every challenge and d_I, z = 0, and the bare PLM
    everything = set(summary["train_tasks"]) | set(summary["test_tasks"])
    assert set(summary["no_prompt"]) == everything
    for d in ("2", "3"):
        entry = summary["per_d"][d]
        assert set(entry["z0"]) == everything
        for challenge in ("seen_same_data", "seen_unseen_data", "unseen_tasks"):
            assert set(entry["random"][challenge]) == set(entry[challenge])
            assert (run_dir / "ist" / f"dI{d}" / f"{challenge}-random" / "chunk000.json").is_file()
        # the control's Proj_b: seeded, reproducible, of the same shapes, and not the one MSF trained
        msf_b = load_artifact(run_dir / "msf" / f"dI{d}").subspace.proj_b
        control = random_proj_b(msf_b.config, RANDOM_SUBSPACE_SEED + int(d))
        assert torch.equal(control.out.weight, random_proj_b(msf_b.config, RANDOM_SUBSPACE_SEED + int(d)).out.weight)
        assert control.out.weight.shape == msf_b.out.weight.shape
        assert not torch.allclose(control.out.weight, msf_b.out.weight)
        assert len(load_chunks(run_dir / "ist" / f"dI{d}" / "unseen_tasks-random")) == len(summary["test_tasks"])
    timings = json.loads((run_dir / "timings.json").read_text())
    assert {"pt", "msf", "ist", "ipt_pt", "recon"} <= set(timings)

    # a rerun trains nothing: every stage is read back from the run directory
    again = run_experiment(cfg, run_dir, pool_dir)
    assert json.loads((run_dir / "timings.json").read_text()) == timings
    assert again["per_d"] == summary["per_d"] and again["stability"] == summary["stability"]

    # an interrupted run resumes: remove one chunk and only it is recomputed
    chunk = next((run_dir / "ist" / "dI3" / "unseen_tasks").glob("chunk000.json"))
    chunk.unlink()
    run_experiment(cfg, run_dir, pool_dir)
    assert chunk.is_file()
    assert json.loads((run_dir / "timings.json").read_text())["ist"] > timings["ist"]

    # a resumed run with other settings would mix two configurations' chunks: refused, naming the setting;
    # more d_I or seeds only add work and are allowed
    changed = ExperimentConfig(**{**cfg.to_dict(), "k_per_class": 3, "pt": {**cfg.pt.__dict__, "max_steps": 5}})
    with pytest.raises(ValueError, match=r"k_per_class, pt\.max_steps differ"):
        run_experiment(changed, run_dir, pool_dir)
    ExperimentRun(ExperimentConfig(**{**cfg.to_dict(), "stability_seeds": [0, 1, 2]}), run_dir, pool_dir)
    # a run directory restored without MSF's weights (they are not committed) refuses to redo MSF silently
    weights = run_dir / "msf" / "dI2" / "subspace.safetensors"
    saved = weights.read_bytes()
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"subspace\.safetensors is missing .* delete"):
        run_experiment(cfg, run_dir, pool_dir)
    weights.write_bytes(saved)

    report = write_report(run_dir)
    text = report.read_text()
    for section in ("## Setup", "E_rel^PT and E_abs", "seen tasks, unseen data", "MSF reconstruction",
                    "## The d_I carried forward", "IST, random Proj_b (control)", "z = 0 of the MSF subspace",
                    "no prompt, bare PLM", "## Stability", "## Intrinsic vectors (PCA)", "## Stage timings",
                    "## Task lists", "## Appendix", "ipt experiment run tiny",
                    "## Does the MSF subspace beat its controls?", "## Unseen tasks by whether MSF saw their family",
                    "## MSF: what the joint LM steps add"):
        assert section in text, section
    assert f"Chosen: **d_I = {summary['best_d']}**" in text
    assert (run_dir / "report-pca.png").stat().st_size > 1000


def test_cpu_sizing_options_and_export(tmp_path: Path, pool_dir: Path, tiny_model_dirs: dict) -> None:
    """The options that size a run for a CPU, and the export of a finished run's Proj_b as a service artifact."""
    base = _config(str(tiny_model_dirs["llama"]))
    newton = {**base.ist.__dict__, "optimizer": "gauss_newton", "max_iterations": 2, "patience_iterations": 1}
    cfg = ExperimentConfig(**{**base.to_dict(), "ist_seen_tasks": 1, "dev_k_per_class": 1, "dev_k_other": 2,
                              "msf_recon_warmup_steps": 20, "stability_seeds": [0, 1], "d_intrinsic": [2],
                              "stability_tasks": 1, "ist": newton})
    run_dir = tmp_path / "run"
    # a partial run: the unseen tasks only, reported and marked as such; the full run then resumes from it
    partial = run_experiment(cfg, run_dir, pool_dir, until="unseen")
    assert partial["partial"] == "unseen" and partial["stability"] is None and not partial["pt"]["unseen-data"]
    assert set(partial["per_d"]["2"]) == {"msf", "z0", "random", "unseen_tasks"}
    assert not (run_dir / "pt" / "unseen-data").exists() and not (run_dir / "ipt_pt").exists()
    text = write_report(run_dir).read_text()
    assert "**Partial run**" in text and "## Stability" not in text and "### seen tasks" not in text
    assert "### unseen tasks" in text and "## Does the MSF subspace beat its controls?" in text
    timings = json.loads((run_dir / "timings.json").read_text())
    summary = run_experiment(cfg, run_dir, pool_dir)
    assert "partial" not in summary
    assert json.loads((run_dir / "timings.json").read_text())["msf"] == timings["msf"]  # MSF was not redone
    # the stability study on `stability_tasks` of the unseen tasks; IST by Gauss-Newton (iterations, history)
    assert len(summary["stability"]["per_task"]) == 1
    assert set(summary["stability"]["per_task"]) < set(summary["test_tasks"])
    for r in summary["per_d"]["2"]["unseen_tasks"].values():
        assert 1 <= r["steps"] <= 2 and r["history"] and r["seconds"] > 0
    # both subspaces choose their start among z = 0 and the train tasks' vectors: not every task starts at z = 0
    for ist in (summary["per_d"]["2"]["unseen_tasks"], summary["per_d"]["2"]["random"]["unseen_tasks"]):
        assert any(r["history"][0]["norm"] > 0 for r in ist.values())
    assert "medoids in prompt space" in write_report(run_dir).read_text()
    # MSF says what its joint LM steps add to the reconstruction warm-up, per task and on average
    msf = summary["per_d"]["2"]["msf"]
    assert set(msf["warmup_dev"]) == set(msf["dev"]) == set(summary["train_tasks"])
    assert msf["warmup_mean_dev_score"] == pytest.approx(sum(msf["warmup_dev"].values()) / len(msf["warmup_dev"]))
    assert set(msf["joint_dev"]) == set(msf["dev"])  # and after the joint steps, whether or not they were kept
    assert msf["joint_mean_dev_score"] == pytest.approx(sum(msf["joint_dev"].values()) / len(msf["joint_dev"]))
    assert "last joint evaluation" in write_report(run_dir).read_text()
    seen = summary["seen_ist_tasks"]
    assert len(seen) == 1 and seen[0] in summary["train_tasks"]
    assert set(summary["per_d"]["2"]["seen_same_data"]) == set(seen) == set(summary["pt"]["unseen-data"])
    assert set(summary["per_d"]["2"]["recon"]) == set(summary["train_tasks"])  # MSF still uses every train task
    # the first stability seed is the main PT run, not a second training of the same thing
    assert not (run_dir / "pt" / "stability-seed0").exists() and (run_dir / "pt" / "stability-seed1").is_dir()
    first = summary["stability"]["per_task"]
    assert all(r["pt"][0] == summary["pt"]["main"][n]["test"] for n, r in first.items())
    assert "## Appendix" in write_report(run_dir).read_text()  # train tasks without IST rows render as n/a

    out = export_artifact(run_dir, tmp_path / "artifact")
    artifact = load_artifact(out)
    assert artifact.subspace.proj is None and artifact.metadata.weights_dtype == "float16"
    assert artifact.metadata.config["d_intrinsic"] == 2
    check = artifact.metadata.eval_summary["fp16_check"]
    assert set(check["test_fp32"]) == set(summary["test_tasks"]) and check["max_abs_prompt_difference"] < 1e-2
    shipped_vectors = load_named(out / VECTORS_FILE)  # the IST starts the service chooses from
    assert set(shipped_vectors) == set(summary["train_tasks"])
    assert all(v.shape == (2,) for v in shipped_vectors.values())
    card = (out / "MODEL_CARD.md").read_text()
    assert "d_I = 2" in card and all(n in card for n in summary["train_tasks"])

    names = ["ist-lr-0.1", "init-nearest", "msf-without-proj", "ist-lbfgs", "ist-adamw-equal-time",
             "ist-gauss-newton-starts"]
    levers = run_levers(run_dir, only=names)
    assert [r["lever"] for r in levers] == names
    assert levers[3]["optimizer"] == "lbfgs" and all(r["history"] for r in levers[3]["per_task"].values())
    # AdamW at Gauss-Newton's wall time: the Gauss-Newton lever ran first (cached), and each AdamW task stopped at
    # its first evaluation past that task's Gauss-Newton seconds
    newton = json.loads((run_dir / "ablations" / "ist-gauss-newton.json").read_text())
    assert newton["optimizer"] == "gauss_newton"
    for name, v in levers[4]["per_task"].items():
        budget = newton["per_task"][name]["seconds"]
        assert v["seconds"] >= budget - 0.01 if v["error"] == STOPPED_BY_REQUEST else v["error"] is None
    # started among the known vectors: a task's first evaluation is at one of them (|z| > 0), not only at z = 0
    assert levers[5]["starts"] == "medoids" and newton["starts"] == "zero"
    assert any(v["history"][0]["norm"] > 0 for v in levers[5]["per_task"].values())
    assert all(v["history"][0]["norm"] == 0 for v in newton["per_task"].values())
    for r in levers:
        assert set(r["per_task"]) == set(summary["test_tasks"])
        assert (run_dir / "ablations" / f"{r['lever']}.json").is_file()
    assert levers[0]["ist"]["learning_rate"] == 0.1
    assert (run_dir / "ablations" / "msf-msf-without-proj" / "dI2" / "subspace.json").is_file()
    (slow,) = run_levers(run_dir, only=["msf-lr-1e-5"])  # MSF's joint steps at another learning rate
    made = json.loads((run_dir / "ablations" / "msf-msf-lr-1e-5" / "dI2" / "subspace.json").read_text())
    assert made["provenance"]["learning_rate"] == 1e-5 and set(slow["per_task"]) == set(summary["test_tasks"])
    again = run_levers(run_dir, only=["ist-lr-0.1"])  # cached: read back, not recomputed
    assert again[0] == levers[0]
    notes = tmp_path / "notes.md"
    notes.write_text("## Discussion\n\nWhy the numbers differ.\n")
    text = write_report(run_dir, tmp_path / "results.md", notes).read_text()
    assert "## Levers tried" in text and "Why the numbers differ." in text
    # the run has no d_I = 250, so its largest is compared; the run's figure is recomputed here by hand
    pt = summary["pt"]["main"]
    counted = [n for n in summary["test_tasks"] if summary["learnable"][n] and pt[n]["test"] > 0]
    ist = summary["per_d"]["2"]["unseen_tasks"]
    expected = (f"{100 * sum(ist[n]['test'] / pt[n]['test'] for n in counted) / len(counted):.1f}" if counted
                else "n/a")
    title = "| E_rel^PT, unseen tasks (d_I = 2, chosen on dev) |"
    row = next(line for line in text.splitlines() if line.startswith(title))
    assert row.startswith(f"{title} 83% | {expected}") and f"(k={len(counted)})" in row
    copied = copy_summaries(run_dir, tmp_path / "published")
    assert (tmp_path / "published" / "summary.json").is_file() and (tmp_path / "published" / "ablations").is_dir()
    assert copied and all(p.suffix in (".json", ".yaml", ".txt") for p in copied)
    assert not list((tmp_path / "published").rglob("*.safetensors"))
    assert (tmp_path / "results-pca.png").is_file() and (tmp_path / "results-e-rel.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown lever"):
        run_levers(run_dir, only=["nope"])


def test_max_per_family_caps_subtasks() -> None:
    names = ["arithmetic:3", "arithmetic:1", "arithmetic:2", "color:hex", "strategyqa"]
    assert cap_per_family(names, 2) == ["arithmetic:1", "arithmetic:2", "color:hex", "strategyqa"]
    assert cap_per_family(names, 1) == ["arithmetic:1", "color:hex", "strategyqa"]


def test_report_needs_a_finished_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"summary\.json is missing"):
        write_report(tmp_path)


def test_configs_in_the_repo_load() -> None:
    smoke = load_config("smoke")
    assert smoke.d_intrinsic
    for paper in (load_config("paper-small"), load_config("paper-small-cpu")):
        assert paper.d_intrinsic == [5, 10, 50, 100, 250]
        assert len(paper.stability_seeds) >= 5  # a claim about stability needs at least 5 seeds
        assert paper.ist.patience_steps and paper.ist.dev_loss  # IST runs to convergence
    study = load_config("bigbench-100")  # the paper-scale study (issue 15)
    assert study.max_train_tasks >= 100 and study.max_test_tasks >= 24 and study.max_per_family == 3
    assert study.ist.optimizer == "gauss_newton" and {10, 50, 250} <= set(study.d_intrinsic)
    assert len(study.stability_seeds) >= 5 and study.stability_tasks >= 12 and study.ist_seen_tasks >= 24
    assert study.pt.dev_loss  # PT's reference prompts: dev ties broken by dev loss, not stopped at their start
    # its rerun with PT's other recipe changes that recipe and nothing else, so that the two runs compare
    shared = load_config("bigbench-100-shared").to_dict()
    changed = {k for k in shared if shared[k] != study.to_dict()[k]}
    assert changed == {"name", "pt_start", "pt"} and shared["pt_start"] == "shared"
    assert {k for k in shared["pt"] if shared["pt"][k] != study.to_dict()["pt"][k]} == {"learning_rate"}
    with pytest.raises(FileNotFoundError, match="smoke"):
        load_config("nope")


def test_unknown_config_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(str(path))


def test_trivial_scores() -> None:
    assert trivial_score(make_task()) == pytest.approx(0.5)  # majority label on a balanced dev set
    assert trivial_score(make_task("mc", TaskKind.MULTIPLE_CHOICE)) == pytest.approx(0.5)
    # generation: the most frequent train output ("x") guessed for every dev input, scored by the task's metric
    gen = Task("gen", TaskKind.GENERATION, [Example("a", "x"), Example("b", "x"), Example("c", "y")],
               [Example("d", "x"), Example("e", "z"), Example("f", "x"), Example("g", "w")], [Example("h", "x")],
               metric=MetricName.EXACT_MATCH)
    assert trivial_score(gen) == pytest.approx(0.5)


def test_the_two_draws_and_the_test_set_share_no_text(tmp_path: Path, pool_dir: Path) -> None:
    """"Seen tasks, unseen data" draws train/dev that the main draw (and so MSF) never saw, and neither draw
    touches the test set, by normalised text."""
    cfg = _config("unused-backbone")  # no stage runs: only the few-shot draws are read
    run = ExperimentRun(cfg, tmp_path / "run", pool_dir)
    names = run.train_names + run.test_names
    for main, other in zip(run.tasks(names, cfg.data_seed), run.tasks(names, cfg.unseen_data_seed), strict=True):
        main_texts, other_texts = texts_of([*main.train, *main.dev]), texts_of([*other.train, *other.dev])
        assert main_texts and other_texts and not main_texts & other_texts, main.name
        assert not (main_texts | other_texts) & texts_of(main.test), main.name
        assert [e.input for e in main.test] == [e.input for e in other.test]


@pytest.mark.parametrize("pt_start", ["per_task", "shared"])
def test_pt_start_decides_whether_tasks_share_their_starting_prompt(tmp_path: Path, pool_dir: Path,
                                                                    tiny_model_dirs: dict, pt_start: str) -> None:
    """With pt_start "shared" every task's PT starts from one draw, so after a tiny step the prompts still nearly
    agree; with "per_task" each task starts from its own draw and they differ by a token's size."""
    from ipt_engine.prompt_tuning import sample_vocab_prompts, shared_start_prompts

    base = _config(str(tiny_model_dirs["llama"]))
    tiny_step = {**base.pt.__dict__, "learning_rate": 1e-4, "max_steps": 1}
    cfg = ExperimentConfig(**{**base.to_dict(), "pt_start": pt_start, "pt": tiny_step})
    run = ExperimentRun(cfg, tmp_path / "run", pool_dir)
    names = run.train_names[:2]
    _, prompts = run.prompt_tuning("main", names, cfg.data_seed, train_seed=0)
    a, b = (prompts[n].float() for n in names)
    emb = run.backbone.input_embeddings.detach().float().cpu()
    token = float(emb.norm(dim=-1).mean())
    if pt_start == "shared":
        start = shared_start_prompts(emb, 2, cfg.n_prompt, seed=0)
        assert torch.equal(start[0], start[1]) and torch.equal(start[:1], sample_vocab_prompts(emb, 1, cfg.n_prompt, 0))
        assert float((a - b).norm(dim=-1).max()) < 0.05 * token
        assert float((a - start[0]).norm(dim=-1).max()) < 0.05 * token  # it is the start PT moved from
    else:
        assert float((a - b).norm(dim=-1).mean()) > 0.5 * token


def test_pt_start_must_be_known() -> None:
    with pytest.raises(ValueError, match="pt_start"):
        ExperimentConfig(name="x", pt_start="random")
