from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import serving_bench
from tests.benchmarks.conftest import finite_positive


def test_serving_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "benchmarks.md"
    # a 50 ms batching window, so that concurrent requests do share forward passes even on a busy machine
    report = serving_bench.main(["--quick", "--tasks", "1,8,64", "--requests", "32", "--concurrency", "16",
                                 "--max-wait-ms", "50", "--rounds", "2", "--write-docs", str(docs)])
    out = capsys.readouterr().out
    for row in ("batched server, 1 task in the stream", "batched server, 64 tasks in the stream",
                "one request per forward (IPT_BATCH_MAX_SIZE=1), 64 tasks", "bare PLM (engine, no prompt), batch 32"):
        assert f"| {row}" in out
    assert "1 tasks vs 1 task" not in out and "64 tasks vs 1 task:" in out
    v = report.values
    assert finite_positive([v[f"{m}_{k}"] for m in ("throughput", "p50", "p99") for k in (1, 8, 64)])
    assert all(v[f"p50_{k}"] <= v[f"p99_{k}"] for k in (1, 8, 64))
    assert finite_positive([v["per_request_throughput"], v["bare_1"], v["bare_batch"], v["bare_gain"]])
    assert finite_positive([v["engine_prefix_cache_gain"], v["client_cpu_per_request"]])
    assert v["client_cpu_per_request"] < 0.005  # the load client must not take the server's CPU (httpx: ~9 ms)
    # two interleaved rounds of 32 requests pooled per batched configuration
    assert len(v["prefix_cache_gain_per_round"]) == 2 and finite_positive(v["prefix_cache_gain_per_round"])
    assert min(v["prefix_cache_gain_per_round"]) <= v["prefix_cache_gain"] <= max(v["prefix_cache_gain_per_round"])
    assert "2 interleaved round(s)" in out
    # the predictor's own histograms: one task per forward for a one-task stream, several for a mixed one
    assert v["tasks_per_forward_1"] == 1.0
    assert 1.0 < v["tasks_per_forward_64"] <= v["inputs_per_forward_64"] <= 32
    assert v["inputs_per_forward_1"] > 1.0  # the single task's requests were batched too
    # the model thread's busy time, from the wrapped MicroBatcher.run_batch, fits in the run's wall time
    assert all(0 < v[f"model_busy_{k}"] <= 1.05 for k in (1, 8, 64)) and 0 < v["model_busy_per_request"] <= 1.05
    text = docs.read_text()
    assert "<!-- serving_bench:cpu start -->" in text and "- machine: " in text and "- date: " in text


def test_a_seq2seq_backbone_is_served_without_a_prefix_cache(tiny_model_dirs, capsys) -> None:  # type: ignore[no-untyped-def]
    report = serving_bench.main(["--backbone", str(tiny_model_dirs["bart"]), "--subspace", "random", "--n-prompt", "4",
                                 "--d-intrinsic", "8", "--d-hidden", "16", "--tasks", "1,8", "--requests", "16",
                                 "--concurrency", "8", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "- prefix KV cache: none (a seq2seq backbone" in out and "prefix KV cache, 8 tasks:" not in out
    assert report.values["prefix_cache_bytes_held"] == 0 and "prefix_cache_gain_per_round" not in report.values
    assert finite_positive([report.values["throughput_8"], report.values["no_prefix_cache_throughput"]])


def test_model_flops_count_the_body_per_token_and_the_head_per_scored_column(tiny_causal) -> None:  # type: ignore[no-untyped-def]
    body, head = serving_bench.model_parameters(tiny_causal)
    named = dict(tiny_causal.model.named_parameters())
    assert body == sum(p.numel() for name, p in named.items() if "embed_tokens" not in name and "lm_head" not in name)
    assert head == tiny_causal.model.config.vocab_size * tiny_causal.hidden_size
    work = serving_bench.request_work(tiny_causal, "category", ["sports", "weather"], ["a match", "rain all day"])
    # each label is fed after the source (its EOS only scored), and the head runs there and at the source's end
    assert work.scored == work.options + 1 and work.options >= 2 and work.source > 2
    # the cache skips the prompt and the task's source prefix ("category:", which tokenizes alone, a whole input
    # following it), all of it
    prefix = len(tiny_causal.tokenizer("category:").input_ids)
    assert work.prefix == prefix and 0 < work.prefix < work.source
    assert work.flops(20, False, body, head) == 2 * body * (20 + work.source + work.options) + 2 * head * work.scored
    assert work.flops(20, False, body, head) - work.flops(20, True, body, head) == 2 * body * (20 + prefix)
