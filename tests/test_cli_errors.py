"""Bad input at the command line ends in one line, `templar CMD: error: ...`, and exit code 2: never a traceback.
(templar/cli.py handles every TemplarError once; these cases reach it from each tool.)"""

from __future__ import annotations

import pytest

from templar.cli import main
from templar.server.ports import free_port


@pytest.fixture()
def files(tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                         "{not json\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: [unclosed\n")
    return {"bad_jsonl": str(bad_jsonl), "bad_yaml": str(bad_yaml), "missing": str(tmp_path / "missing"),
            "empty_dir": str(tmp_path)}


CASES = {
    "export without a model folder": (["export", "--model", "{missing}", "--name", "rm"],
                                      "model folder {missing} does not exist"),
    "export with a bad name": (["export", "--model", "{empty_dir}", "--name", "../x"], "invalid model name '../x'"),
    "serve an empty repository": (["serve", "--repo", "{empty_dir}"], "holds no models"),
    "score a file with a bad line": (["score", "--model", "rm", "--data", "{bad_jsonl}"], "bad.jsonl line 2: row is "
                                     "not JSON"),
    "score a missing file": (["score", "--model", "rm", "--data", "{missing}"], "conversation file {missing} does "
                             "not exist"),
    "train with invalid YAML": (["train", "--config", "{bad_yaml}"], "bad.yaml is not valid YAML"),
    "train with an unknown key": (["train", "--config", "configs/demo.yaml", "ppo.lr=1"],
                                  "unknown key ppo.lr"),
    "train with a missing config": (["train", "--config", "{missing}"], "cannot read config {missing}"),
    "assets of an unknown family": (["assets", "gpt9"], "unknown tokenizer family 'gpt9'"),
    "loadtest without a server": (["loadtest", "--url", "127.0.0.1:{port}", "--model", "rm", "--requests", "1"],
                                  "no Triton server answers at 127.0.0.1:{port}"),
    "loadtest with a bad file": (["loadtest", "--url", "127.0.0.1:{port}", "--model", "rm", "--data", "{missing}"],
                                 "conversation file {missing} does not exist"),
    "bench with a bad file": (["bench", "--data", "{bad_jsonl}", "--out", "{empty_dir}/b"], "bad.jsonl line 2"),
    "score-demo with a missing config": (["score-demo", "--config", "{missing}"], "cannot read config {missing}"),
    "bench-precision without fp32": (["bench-precision", "--precisions", "bf16", "--out", "{empty_dir}/p.json"],
                                     "--precisions must include fp32"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, files, capsys, monkeypatch):
    monkeypatch.chdir(__file__.rsplit("/tests/", 1)[0])  # configs/demo.yaml, as a user runs it from the checkout
    values = {**files, "port": str(free_port())}
    argv, message = CASES[case]
    code = main([arg.format(**values) for arg in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("templar ")]
    command = argv[0]
    assert code == 2, (case, err)
    assert errors == [f"templar {command}: error: {message.format(**values)}"] or (
        len(errors) == 1 and errors[0].startswith(f"templar {command}: error: ")
        and message.format(**values) in errors[0]), (case, err)
    assert "Traceback" not in err


def test_argument_errors_are_argparses_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["loadtest", "--model", "rm", "--concurrency", "0,x"])
    assert exit_.value.code == 2
    assert "templar loadtest: error: argument --concurrency: takes comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--model", ".", "--name", "rm", "--template-kwargs", "[1]"])
    assert "argument --template-kwargs: must be a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--setting", "queue_delay=5"])
    assert "argument --setting: takes NAME=VALUE with NAME one of" in capsys.readouterr().err
