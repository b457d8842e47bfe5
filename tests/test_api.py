"""The Python API without any config, as docs/api.md shows it: ground truth -> datamodule -> method -> fit ->
evaluate. The code below is read from docs/api.md and run, so the page cannot drift from what works."""

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_the_config_free_example_of_docs_api_runs_and_learns(tmp_path, capsys, monkeypatch):
    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"Without any config \(this is `tests/test_api.py`\):\n\n```python\n(.*?)```", text, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)  # whatever it writes stays here
    runpy.run_path(str(script), run_name="__main__")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    kl = float(line.split()[2])
    assert line.startswith("test KL") and line.endswith("nats")
    assert 0 < kl < 0.5  # an IWAE trained 200 epochs on Circle is close to the truth (measured: 0.024)
