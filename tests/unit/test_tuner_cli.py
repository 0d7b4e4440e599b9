"""`shuttle tune plan` writes a plan file that `shuttle run/serve --plan` read; flags override it."""

import argparse

import pytest
import yaml

from shuttle.cli import engine_config, main
from shuttle.plan_file import load_plan_values


def test_plan_for_a_gpu_cluster_writes_a_plan_that_run_and_serve_accept(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    rc = main(["tune", "plan", "--model", "dbrx-132b", "--attention-gpus", "H20", "--expert-gpus", "L40S,H100",
               "--tp", "1,2", "--attention-ranks", "4,8,12,16", "--tpot-ms", "150", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| 1 |" in text and "tokens/s/cost" in text and "paper's rule gives m = 3" in text and "rejected:" in text
    doc = yaml.safe_load(out.read_text())
    assert set(doc) == {"engine", "plan", "prediction", "why"}
    assert doc["engine"]["micro_batches"] == 3 and doc["plan"]["attention_gpu"] == "H20"
    values = load_plan_values(str(out))
    config = engine_config(argparse.Namespace(micro_batches=4), values)      # a flag overrides the plan
    assert config.micro_batches == 4 and config.attention_ranks == doc["engine"]["attention_ranks"]
    assert config.dtype == "bfloat16"


def test_plan_without_a_feasible_candidate_fails_with_the_reasons(tmp_path, capsys):
    rc = main(["tune", "plan", "--model", "dbrx-132b", "--attention-gpus", "L4", "--expert-gpus", "L4", "--tp", "1",
               "--tpot-ms", "1", "--out", str(tmp_path / "p.yaml")])
    err = capsys.readouterr().err
    assert rc == 1 and "no deployment plan meets the requirements (TPOT ≤ 1 ms" in err and "expert memory" in err
    assert not (tmp_path / "p.yaml").exists()


def test_list_gpus(capsys):
    assert main(["tune", "plan", "--model", "dbrx-132b", "--list-gpus"]) == 0
    out = capsys.readouterr().out
    assert "H20: 96 GB, 4000 GB/s, 148 TFLOP/s" in out and "L40S" in out


def test_plan_file_sections(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("engine: {attention_ranks: 2, micro_batches: 3}\nplan: {attention_gpu: H20}\nprediction: {tpot_ms: 40}\n")
    assert load_plan_values(str(p)) == {"attention_ranks": 2, "micro_batches": 3}
    p.write_text("engine: {attention_ranks: 2}\nplna: {}\n")
    with pytest.raises(ValueError, match="unknown sections plna"):
        load_plan_values(str(p))
    p.write_text("engine: {attention_ranks: 2, microbatches: 3}\nplan: {}\n")
    with pytest.raises(ValueError, match="unknown engine config keys: microbatches"):
        load_plan_values(str(p))
    p.write_text("attention_ranks: 2\nexpert_ranks: 3\n")                          # the flat layout still works
    assert load_plan_values(str(p)) == {"attention_ranks": 2, "expert_ranks": 3}
