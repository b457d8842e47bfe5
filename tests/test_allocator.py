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

# Ten forward/backward steps of a decoder-sized MLP (10,000 rows x 50 units: 2 MB activations), as a large-S
# IWAE step runs them; prints the kernel's count of minor page faults per step after two warm-up steps.
STEPS = """
import resource, sys, torch
from omegaconf import OmegaConf
from mapa_exp.nets import MLP
from mapa_exp.runs.allocator import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "kept":
    assert keep_freed_memory(OmegaConf.to_container(OmegaConf.load("conf/train.yaml").malloc))
net, x = MLP(1, 2, members=1), torch.randn(1, 10000, 1)
def step():
    net(x).pow(2).sum().backward()
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return float(out.stdout.strip())


@pytest.mark.skipif(_glibc() is None, reason="the malloc settings are glibc's")
def test_the_default_settings_keep_a_steps_freed_memory_so_that_later_steps_do_not_fault():
    default, kept = faults_per_step("default"), faults_per_step("kept")
    # glibc's defaults map and unmap the step's large buffers: hundreds of fresh 4 KiB pages a step
    assert default > 100, default
    assert kept < default / 5, (kept, default)


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
