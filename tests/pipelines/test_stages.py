"""Job pieces without Ray: stage contracts, shard listing, resume bookkeeping, config checks."""

from __future__ import annotations

import pyarrow as pa
import pytest

from grounding.storage import StorageOptions
from pipelines import schema
from pipelines.config import LabelJobConfig


def test_a_stage_names_the_missing_columns_and_who_should_have_made_them():
    from pipelines.stages.parse_boxes import ParseBoxes

    stage = ParseBoxes("qwen3_vl", '{"min_pixels": 4096, "max_pixels": 65536, "factor": 32}', {})
    with pytest.raises(ValueError, match=r"parse_boxes.*\['raw_text', 'tokens'.*stage 'infer'"):
        stage(pa.table({"row_id": ["a"], "width": [1], "height": [1], "error_code": [None],
                        "logprobs": [[0.0]]}))


def test_parse_stage_turns_text_into_original_pixel_boxes():
    from pipelines.stages.parse_boxes import ParseBoxes

    rows = [{"row_id": "s:0", "raw_text": '[{"bbox_2d": [100, 200, 500, 1000], "label": "x"}]',
             "tokens": ["[{\"", "100", "200", "500", "1000"], "logprobs": [0.0, -0.1, -0.1, -0.1, -0.1],
             "width": 200, "height": 100, "error_code": None},
            {"row_id": "s:1", "raw_text": None, "tokens": None, "logprobs": None, "width": None,
             "height": None, "error_code": "missing", "error": "image not found"}]
    out = ParseBoxes("qwen3_vl", '{"min_pixels": 4096, "max_pixels": 65536, "factor": 32}',
                     {"job_id": "j"})(schema.table(rows, schema.GENERATED)).to_pylist()
    b = out[0]["boxes"][0]
    assert (b["x1"], b["y1"], b["x2"], b["y2"]) == (20.0, 20.0, 100.0, 100.0)
    assert out[0]["status"] == "ok" and out[0]["score"] == pytest.approx(0.904837, rel=1e-5)
    assert out[1]["status"] == "error" and out[1]["boxes"] == [] and out[1]["job_id"] == "j"


def test_list_shards_finds_every_format_and_skips_private_files(tmp_path):
    from pipelines.stages.read import list_shards

    for name in ("a.jsonl", "sub/b.parquet", "sub/c.json", "notes.txt", "_job.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    got = [rel for _, rel in list_shards(str(tmp_path), StorageOptions())]
    assert got == ["a.jsonl", "sub/b.parquet", "sub/c.json"]
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "nope"), StorageOptions())


def test_resuming_with_another_model_is_refused(tmp_path):
    from pipelines.output import JobOutput

    out = JobOutput(str(tmp_path / "o"), StorageOptions())
    lineage = {"model": "m1", "family": "qwen3_vl", "prompt_version": "p", "default_adapter": None}
    rec = out.start_job(lineage, None, {})
    assert out.start_job(lineage, None, {})["job_id"] == rec["job_id"]
    with pytest.raises(ValueError, match=r"model='m1'.*'m2' \(--model\)"):
        out.start_job(dict(lineage, model="m2"), None, {})
    assert out.job_record()["model"] == "m1"


@pytest.mark.parametrize("kw, flag", [
    ({"min_pixels": 100, "max_pixels": 10}, "--max-pixels"),   # inverted pixel bounds
    ({"output": "in"}, "--output"),                            # output over the input
])
def test_config_cross_checks_name_the_flag(kw, flag):
    with pytest.raises(ValueError, match=flag):
        LabelJobConfig(**{"input": "in", "output": "out", **kw})


def test_checked_in_job_specs_load():
    from pathlib import Path

    import yaml

    specs = sorted((Path(__file__).parents[2] / "pipelines" / "configs").glob("*.yaml"))
    assert specs
    for spec in specs:
        LabelJobConfig.model_validate(yaml.safe_load(spec.read_text()))


def test_engine_length_limit_is_a_job_and_serve_setting():
    from groundlabel.cli import build_parser
    from groundlabel.flags import model_from_args
    from pipelines.config import LabelJobConfig
    from serve.config import ServeConfig

    a = build_parser().parse_args(["label", "--input", "x", "--output", "y",
                                   "--max-model-len", "4096"])
    assert model_from_args(LabelJobConfig, a).inference.max_model_len == 4096
    default = LabelJobConfig(input="x", output="y").inference
    assert default.max_model_len is None and default.model_len() == 1024  # derived (tiny)
    a = build_parser().parse_args(["serve", "--max-model-len", "4096"])
    assert model_from_args(ServeConfig, a).inference.max_model_len == 4096
