"""The allocator settings: they remove the page faults of a training step (counted by the kernel, not by us),
and bad values are refused with a line naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mapa_exp.errors import ConfigError
from mapa_exp.runs.allocator import _glibc, check_malloc

ROOT = Path(__file__).resolve().parents[1]
TRAIN_YAML = ROOT / "conf" / "train.yaml"

# Training steps of a stacked decoder-sized MLP (3 members, 50 units) on chunks of 3,000, 2,000 and 1,000 rows
# (0.6-1.8 MB activations), as an epoch runs chunks of different sizes; prints the median over 20 steps of the
# kernel's count of minor page faults in a step, after ten warm-up steps.
STEPS = """
import resource, sys, torch
from omegaconf import OmegaConf
from mapa_exp.nets import MLP
from mapa_exp.runs.allocator import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "kept":
    assert keep_freed_memory(OmegaConf.to_container(OmegaConf.load("conf/train.yaml").malloc))
net = MLP(1, 2, members=3)
chunks = [torch.randn(3, n, 1) for n in (3000, 2000, 1000)]
def step():
    for x in chunks:
        net(x).pow(2).sum().backward()
for _ in range(10):
    step()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[10])
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return float(out.stdout.strip())


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
@pytest.mark.skipif(_glibc() is None, reason="the malloc settings are glibc's")
def test_the_default_settings_keep_a_steps_freed_memory_so_that_later_steps_do_not_fault():
    # glibc's moving threshold settles in about one process of ten: the more of two fresh processes
    default = max(faults_per_step("default") for _ in range(2))
    kept = faults_per_step("kept")
    # glibc's defaults map and unmap the step's large buffers: hundreds of fresh 4 KiB pages in most steps
    assert default > 100, default
    assert kept <= default / 10, (kept, default)


def test_the_shipped_settings_are_valid_and_null_means_glibcs_defaults():
    shipped = OmegaConf.to_container(OmegaConf.load(TRAIN_YAML).malloc)
    assert check_malloc(shipped) == shipped
    assert check_malloc(None) == {}
    assert check_malloc({"top_pad": None, "trim_threshold": 0}) == {"trim_threshold": 0}


@pytest.mark.parametrize("settings, key", [
    ({"mmap_threshold": 2**26}, "malloc.mmap_threshold"),  # above glibc's 32 MiB: mallopt would refuse it
    ({"trim_threshold": -1}, "malloc.trim_threshold"),
    ({"top_pad": "big"}, "malloc.top_pad"),
    ({"arena_max": 2}, "malloc.arena_max"),
])
def test_a_bad_setting_is_refused_naming_it(settings, key):
    with pytest.raises(ConfigError, match=key):
        check_malloc(settings)
