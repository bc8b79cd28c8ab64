"""CLI conventions: --version, -v/-q anywhere, defaults and choices in --help, one default per concept, defaults
written once (in the stage configs), and the result line `wrote PATH`."""

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import PurePath

import pytest

from cli.main import COMMANDS, main, parser, version
from conftest import REPO
from visprune.models.llava import DEFAULT_MODEL


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def command_parser(name: str) -> argparse.ArgumentParser:
    return parser(name).command_parsers[name]


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"visprune {version()}" and version()[0].isdigit()


@pytest.mark.parametrize("flags", [["-v", "-q"], ["--verbose", "--quiet"]])
def test_verbosity_before_or_after_the_subcommand(flags):
    for argv in ([*flags, "recipe", "r.json"], ["recipe", *flags, "r.json"], ["recipe", "r.json", *flags]):
        args = parser("recipe").parse_args(argv)
        assert args.verbose and args.quiet, argv
    args = parser("recipe").parse_args(["recipe", "r.json"])
    assert not args.verbose and not args.quiet


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_every_default_and_choice(name):
    p = command_parser(name)
    p.format_help()  # formats every help string (a stray % would fail here)
    one_of = {a for group in p._mutually_exclusive_groups if group.required for a in group._group_actions}
    for action in p._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action in one_of:
            continue
        if action.choices:
            assert all(str(choice) in action.help for choice in action.choices), action.dest
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction))
        if not action.required and not switch:
            assert "default" in action.help, f"{name} {action.option_strings} does not show its default"


def test_every_defaulted_flag_comes_from_its_config():
    """Each stage config's defaults reach the CLI unchanged (no flag repeats a default of its own)."""
    from calibrate import CalibrationConfig
    from engines import BuildConfig
    from exporter import ExportConfig
    from workflows.end_to_end import PipelineConfig
    from workflows.tradeoff import TradeoffConfig

    for name, config in (("calibrate", CalibrationConfig), ("export", ExportConfig), ("build", BuildConfig),
                         ("pipeline", PipelineConfig), ("tradeoff", TradeoffConfig)):
        defaults = {a.dest: a.default for a in command_parser(name)._actions}
        for field, value in ((f.name, f.default) for f in dataclasses.fields(config)):
            if field in defaults and defaults[field] is not argparse.SUPPRESS:
                given = tuple(defaults[field]) if isinstance(defaults[field], list) else defaults[field]
                assert given == value, (name, field)


def test_one_default_model_and_backend():
    models = {name: a.default for name in COMMANDS for a in command_parser(name)._actions if a.dest == "model"}
    assert {m for m in models.values() if m is not None} == {DEFAULT_MODEL}, models
    # commands that read an artifact take its model unless told: no default there
    assert models["report"] is None and models["eval"] is None and models["recipe"] is None
    backends = {name: a.default for name in ("build", "pipeline") for a in command_parser(name)._actions
                if a.dest == "backend"}
    assert len(set(backends.values())) == 1, backends


def test_no_default_output_is_a_tracked_path():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    tracked_paths = {line for line in tracked.splitlines()}
    tracked_dirs = {str(p) for line in tracked_paths for p in PurePath(line).parents}
    for name in COMMANDS:
        for action in command_parser(name)._actions:
            if action.dest == "out" and action.default not in (None, argparse.SUPPRESS):
                assert str(action.default) not in tracked_paths | tracked_dirs, (name, action.default)
    assert str(command_parser("tradeoff").get_default("out")) == "runs/tradeoff"


def test_negative_text_tokens_are_refused(capsys):
    code, _, err = run_cli(capsys, "recipe", REPO / "recipes/llava-1.5-7b/fitprune-60.json", "--model",
                           "llava-1.5-7b", "--text-tokens", "-100")
    assert code == 2 and "--text-tokens must be 0 or more" in err and "\nHint: " in err


def test_a_prompt_that_is_not_utf8_is_a_usage_error(tmp_path):
    argv = [sys.executable, "-m", "cli", "run", "--engine", os.fsencode(tmp_path), "--image", b"x.png",
            "--prompt", b"caf\xe9 \xff\xfe?"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    result = subprocess.run(argv, capture_output=True, env=env, cwd=tmp_path)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "is not UTF-8 text" in err and "\nHint: " in err and "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["calibrate", "--method", "fastv", "--reduction", "0.99"], "at most 0.91"),
    (["export", "--target", "nosuch"], "invalid choice: 'nosuch'"),
    (["export", "--dtype", "float8"], "invalid choice: 'float8'"),
])
def test_what_can_be_checked_fails_before_loading_a_model(tmp_path, capsys, argv, fragment):
    # imports and the model's cached folder made first, so the clock sees only the command's own work: loading
    # the model and preparing samples took ~34 s before these checks came first
    import calibrate.stage, exporter  # noqa: F401
    from visprune.models.llava import resolve_model_path

    resolve_model_path(DEFAULT_MODEL)
    start = time.perf_counter()
    try:
        code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "out", "-q")
    except SystemExit as e:
        code, err = e.code, capsys.readouterr().err
    assert time.perf_counter() - start < 3
    assert code not in (0, 70) and fragment in err and "\nHint: " in err
    assert not (tmp_path / "out").exists()


def test_write_commands_end_with_wrote(exported, capsys, tmp_path, default_set):
    code, out, _ = run_cli(capsys, "report", "--engine", exported["pruned"], "--out", tmp_path / "r",
                           "--max-new-tokens", "2", "-q")
    assert code == 0 and out.strip().splitlines()[-1] == f"wrote {tmp_path / 'r'}", out
    assert "parity" not in out.lower()  # -q: the report itself is not printed


def test_run_stream_keeps_the_timing_line(exported, capsys, default_set):
    image = default_set.samples[0].image
    code, out, err = run_cli(capsys, "run", "--engine", exported["pruned"], "--image", image, "--prompt", "hi",
                             "--max-new-tokens", "3", "--stream")
    assert code == 0 and out.endswith("\n") and "prefill" in err and "ms/token over" in err
    code, out, err = run_cli(capsys, "run", "-q", "--engine", exported["pruned"], "--image", image, "--prompt", "hi",
                             "--max-new-tokens", "3")
    assert code == 0 and out.strip() and err == ""
