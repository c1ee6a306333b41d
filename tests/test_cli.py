"""The command line: help texts, and the precedence flag > config file > default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.cli.options import config_from_args
from pipelines.config import RunConfig, build_config, read_config_file
from retrieval.descriptors.gem import DEFAULT_IMAGE_SIZE

SUBCOMMAND_FLAGS = {
    "extract": [
        "--input",
        "--output",
        "--backbone",
        "--image-size",
        "--scales",
        "--gem-p",
        "--shard-size",
        "--max-pixels",
        "--max-bytes",
        "--config",
        "--runner",
        "--workers",
        "--threads-per-worker",
        "--beam-args",
    ],
    "train": [
        "--descriptors",
        "--output",
        "--index-factory",
        "--sample-size",
        "--seed",
        "--config",
    ],
    "index": ["--descriptors", "--codebook", "--output", "--runner", "--workers", "--config"],
    "merge": ["--shards", "--output"],
    "search": ["--index", "--queries", "--output", "--k", "--nprobe"],
    "evaluate": ["--benchmark", "--out", "--backbone", "--index-factory", "--runner", "--config"],
    "demo": ["--out", "--backbone", "--runner", "--config"],
}


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def test_top_level_help(capsys):
    code, text = run_main(["--help"], capsys)
    assert code == 0
    for command in SUBCOMMAND_FLAGS:
        assert command in text
    assert "summary.json" in text and "--config" in text


@pytest.mark.parametrize("command", sorted(SUBCOMMAND_FLAGS))
def test_subcommand_help(command, capsys):
    code, text = run_main([command, "--help"], capsys)
    assert code == 0
    for flag in SUBCOMMAND_FLAGS[command]:
        assert flag in text, f"{command} --help does not mention {flag}"


def test_missing_required_flag_is_an_error(capsys):
    code, text = run_main(["extract", "--input", "x"], capsys)
    assert code == 2 and "--output" in text
    code, _ = run_main([], capsys)
    assert code == 2


def test_console_script():
    script = Path(sys.executable).parent / "retrieval"
    if not script.exists():
        pytest.skip("console script not installed")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "retrieval extract" in done.stdout


TOML = """\
runner = "local"
workers = 3
[extract]
image_size = 256
scales = [0.5, 1]
gem_p = 4.0
shard_size = 16
max_pixels = 5000000
[index]
factory = "IVF64,Flat"
seed = 7
"""


def test_config_file_overrides_defaults(tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    values = read_config_file(str(path))
    assert values["index_factory"] == "IVF64,Flat" and "factory" not in values
    config = build_config(values)
    default = RunConfig()
    assert config.runner == "local" and config.workers == 3
    assert config.gem.image_size == 256 and config.gem.scales == (0.5, 1.0) and config.gem.p == 4.0
    assert config.gem.backbone == default.gem.backbone
    assert config.shard_size == 16 and config.index_factory == "IVF64,Flat" and config.seed == 7
    assert config.limits.max_pixels == 5_000_000
    assert config.limits.max_bytes == default.limits.max_bytes
    assert config.nprobe == default.nprobe and config.sample_size is None


def test_flags_override_config_file(tmp_path: Path, monkeypatch, capsys):
    from pipelines import stages

    path = tmp_path / "run.toml"
    path.write_text(TOML)
    seen = {}

    def extract(source, output, config, local_output=None):
        seen.update(source=source, output=output, config=config)
        return {"inputs": 3, "indexed": 2, "failed": 1}

    monkeypatch.setattr(stages, "extract", extract)
    assert (
        cli.main(
            [
                "extract",
                "--input",
                "in",
                "--output",
                "out",
                "--config",
                str(path),
                "--image-size",
                "300",
                "--runner",
                "beam",
                "--scales",
                "1,1.5",
                # As in the README: a quoted value that starts with one of our own flags.
                "--beam-args",
                "--runner=DataflowRunner --project=p",
            ]
        )
        == 0
    )
    assert "3 inputs = 2 indexed + 1 failed" in capsys.readouterr().out
    assert (seen["source"], seen["output"]) == ("in", "out")
    config = seen["config"]
    assert config.gem.image_size == 300 and config.runner == "beam"
    assert config.gem.scales == (1.0, 1.5)
    assert config.gem.p == 4.0 and config.shard_size == 16 and config.workers == 3  # from file
    assert config.beam_args == ("--runner=DataflowRunner", "--project=p")
    assert config.gem.max_side == 450

    plain = config_from_args(
        cli.build_parser().parse_args(["extract", "--input", "i", "--output", "o"])
    )
    assert plain == RunConfig()
    assert plain.gem.image_size == DEFAULT_IMAGE_SIZE


def test_json_config_file(tmp_path: Path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"runner": "local", "index": {"nprobe": 8, "sample_size": 1000}}))
    config = build_config(read_config_file(str(path)))
    assert config.runner == "local" and config.nprobe == 8 and config.sample_size == 1000


@pytest.mark.parametrize("text", ["imagesize = 3\n", "[extract]\nbackbone = 'x'\nquality = 9\n"])
def test_unknown_config_keys_are_refused(tmp_path: Path, text: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="unknown settings"):
        read_config_file(str(path))


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="runner"):
        build_config({"runner": "flink"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        build_config({"spark_conf": ["spark.executor.memory"]})
    config = build_config({"runner": "spark", "spark_conf": ["a.b=1", "c.d=x=y"], "master": "yarn"})
    assert dict(config.spark_conf) == {"a.b": "1", "c.d": "x=y"} and config.master == "yarn"
    with pytest.raises(ValueError, match="workers"):
        build_config({"workers": 0})
    with pytest.raises(ValueError, match="image_size"):
        build_config({"image_size": 8})


def test_threads_per_worker():
    assert RunConfig(threads_per_worker=3).threads == 3
    assert RunConfig(runner="local", workers=64).threads >= 1


# --- user mistakes: one line, exit status 2, the traceback only with --verbose -----------------


def _mistakes(tmp_path: Path) -> dict[str, list[str]]:
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[extract]\nimagesize = 3\n")
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    out = str(tmp_path / "out")
    # A CSV manifest whose third line holds a field over the csv module's limit (128 KiB).
    big = tmp_path / "big.csv"
    big.write_text("id,uri\na,a.jpg\nb," + "x" * 200_000 + ".jpg\nc,c.jpg\n")
    nested = tmp_path / "nested"  # a gt.json nested far deeper than the recursion limit
    nested.mkdir(exist_ok=True)
    (nested / "gt.json").write_text("[" * 100_000 + "]" * 100_000)
    no_queries = tmp_path / "no-queries"
    (no_queries / "images").mkdir(parents=True, exist_ok=True)
    (no_queries / "gt.json").write_text('{"images": ["a", "b"], "queries": []}')
    return {
        "manifest field over the csv limit": ["extract", "--input", str(big), "--output", out],
        "nested gt.json": ["evaluate", "--benchmark", str(nested), "--out", out],
        "gt.json without queries": ["evaluate", "--benchmark", str(no_queries), "--out", out],
        "missing input": ["extract", "--input", str(tmp_path / "nonexistent"), "--output", out],
        "unknown scheme": ["extract", "--input", "foo://bucket/photos", "--output", out],
        "unknown config key": [
            "extract",
            "--input",
            str(empty),
            "--output",
            out,
            "--config",
            str(bad_config),
        ],
        "no index": ["search", "--index", str(empty), "--queries", str(empty), "--output", out],
        "no gt.json": ["evaluate", "--benchmark", str(empty), "--out", out],
        "no descriptors": ["train", "--descriptors", str(empty), "--output", out],
    }


EXPECTED_MESSAGES = {
    "manifest field over the csv limit": "big.csv: line 3: field larger than field limit",
    "nested gt.json": "gt.json: nested too deeply to be a ground truth",
    "gt.json without queries": "gt.json has no queries: there is nothing to evaluate",
    "missing input": "nonexistent: no such folder or prefix",
    "unknown scheme": "unknown or unavailable URI scheme 'foo://'",
    "unknown config key": "unknown settings ['imagesize']",
    "no index": "no index.json (not a merged index folder",
    "no gt.json": "no gt.json in",
    "no descriptors": "has no run plan (plan.json)",
}


@pytest.mark.parametrize("case", sorted(EXPECTED_MESSAGES))
def test_user_mistakes_end_in_one_line(case, tmp_path, capsys):
    argv = _mistakes(tmp_path)[case]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrieval: error: "), err
    assert EXPECTED_MESSAGES[case] in lines[0]

    assert cli.main(["--verbose", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("retrieval: error: ")


def test_user_mistake_from_the_console_script(tmp_path):
    script = Path(sys.executable).parent / "retrieval"
    done = subprocess.run(
        [str(script), "extract", "--input", str(tmp_path / "nope"), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("retrieval: error: ") and "Traceback" not in done.stderr


def test_errors_are_redacted(tmp_path, capsys):
    secret = "https://user:hunter2@example.com/x.csv?X-Amz-Signature=deadbeef"
    code = cli.main(["extract", "--input", secret.replace("https", "foo"), "--output", "o"])
    err = capsys.readouterr().err
    assert code == 2 and "hunter2" not in err and "deadbeef" not in err and "***" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[extract]\nshard_size = "eight"\n', "shard_size = 'eight': expected an integer"),
        ("[extract]\nshard_size = 8.5\n", "shard_size = 8.5: expected an integer"),
        ("[index]\nnprobe = true\n", "nprobe = True: expected an integer"),
        ('[learn]\nlearn = "yes"\n', "learn = 'yes': expected true or false"),
        ("[extract]\nscales = [1, 'x']\n", "expected a list of numbers"),
        ('[extract]\nruntime = "tflite-int4"\n', "runtime = 'tflite-int4': one of tensorflow"),
        ("[extract\nshard_size = 8\n", "not valid TOML"),
    ],
)
def test_a_wrong_type_in_a_config_file_is_one_line(tmp_path, capsys, text, message):
    """Each setting's type comes from its declaration (pipelines/settings.py): a config file's
    value of another type is refused by name, never rounded or passed on to fail later."""
    path = tmp_path / "job.toml"
    path.write_text(text)
    argv = ["extract", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert cli.main([*argv, "--config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrieval: error: "), lines
    assert message in lines[0] and str(path) in lines[0]


def test_every_setting_is_a_flag_a_file_key_and_documented():
    """One declaration per setting: its flag parses to the same configuration as its config
    file key, and its help names the default the run configuration holds."""
    from pipelines import settings

    parser = cli.build_parser()
    evaluate = next(
        a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "evaluate"
    )[1]
    flags = {a.dest: a for a in evaluate._actions}
    for setting in settings.SETTINGS:
        if setting.group == "top":  # --verbose: the top-level flag
            continue
        assert setting.name in flags, setting.name
        assert flags[setting.name].help, setting.name
    assert "(default 362)" in flags["image_size"].help
    assert "(default 256)" in flags["shard_size"].help
    via_flag = config_from_args(
        parser.parse_args(["evaluate", "--benchmark", "b", "--out", "o", "--shard-size", "8"])
    )
    assert via_flag == build_config({"shard_size": 8})
