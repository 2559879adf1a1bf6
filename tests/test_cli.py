import json
import subprocess
import sys

from llm2clip.cli import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm2clip", *args], capture_output=True, text=True, timeout=300)


def test_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["data", "synth", "--out", str(out), "--num-images", "12", "--image-size", "16",
                 "--seed", "3", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 3 and sum(manifest["splits"].values()) == 12
    assert main(["data", "inspect", str(out / "train.csv")]) == 0
    assert "read 10 samples, skipped 0" in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = _cli("config", "show", "--set", "synth.num_imgs=3")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "did you mean 'synth.num_images'" in bad.stderr and "Traceback" not in bad.stderr

    broken = tmp_path / "b.jsonl"
    broken.write_text('{"image": "nope.png", "short_caption": "a red circle"}\n')
    strict = _cli("data", "inspect", str(broken), "--strict")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert f"{broken}:1: missing image file" in strict.stderr

    lenient = _cli("data", "inspect", str(broken))
    assert lenient.returncode == 1 and "1 x missing image file" in lenient.stdout


def test_config_keys_lists_every_section(capsys):
    assert main(["config", "keys"]) == 0
    keys = capsys.readouterr().out.split()
    assert {"run.out_dir", "synth.num_images", "data.path", "embedder.model"} <= set(keys)
