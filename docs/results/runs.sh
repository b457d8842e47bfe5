#!/usr/bin/env bash
# The training sweeps behind docs/results/, part by part, from a fixed commit in a git worktree.
#
#   bash docs/results/runs.sh <part> [commit]      # part: density | draws34 | bandwidth | aggressive | list
#   bash docs/results/runs.sh evaluate <part> <evaluation commit> [training commit]
#   bash docs/results/runs.sh chain <part> <commit>  # data set by data set: train, then evaluate (same commit)
#
# DATASETS="clusters spiral" restricts a command to those data sets (default: all five, in the order below).
#
# Each sweep has a fixed folder under $RUNS (default /work/runs/<commit>), so the same command resumes: completed
# members are skipped, unfinished ones resume from their checkpoints. Two sweeps run at a time (one per core),
# each one job after the other (stacked: a configuration's restarts x draws train as one model). Training only
# (evaluate=false): the evaluation runs afterwards, from the evaluation commit, with `evaluate.py sweep=`.
set -euo pipefail
datasets=${DATASETS:-clusters spiral figure8 circle absolute_value}
here=${RUNS_HERE:-$(cd "$(dirname "$0")/../.." && pwd)}
# bash reads a script as it runs: a chain of hours would pick up an edit of this file mid-way (and did: "unexpected
# EOF"), so the whole command runs from a frozen copy
if [ -z "${RUNS_FROZEN:-}" ]; then
  frozen=$(mktemp "${TMPDIR:-/tmp}/runs.XXXXXX.sh"); cp "$0" "$frozen"
  export RUNS_FROZEN=$frozen RUNS_HERE=$here
  exec bash "$frozen" "$@"
fi
PAR=${PAR:-2}

tree_of() {  # a worktree of the commit, with its own environment (its package, not the checkout's)
  local tree=/work/trees/$1
  if [ ! -d "$tree" ]; then git -C "$here" worktree add --detach "$tree" "$1" >&2; fi
  if [ ! -x "$tree/.venv/bin/python" ]; then
    (cd "$tree" && python3 -m venv .venv && .venv/bin/pip install -q -r requirements-cpu.txt -e . >&2)
  fi
  echo "$tree"
}

if [ "${1:-}" = chain ]; then  # one data set after the other: its sweeps, then its evaluation
  part=${2:?usage: runs.sh chain <part> <commit>}; commit=${3:?the commit}
  for ds in $datasets; do
    DATASETS=$ds bash "$0" "$part" "$commit"
    DATASETS=$ds bash "$0" evaluate "$part" "$commit" "$commit"
  done
  exit 0
fi

if [ "${1:-}" = evaluate ]; then  # score every run of a part's sweeps (exact quadrature), resumable
  part=${2:?usage: runs.sh evaluate <part> <evaluation commit> [training commit]}
  etree=$(tree_of "${3:?the evaluation commit}")
  RUNS=${RUNS:-/work/runs/${4:-7359012}}
  cd "$etree" && . .venv/bin/activate
  export MAPA_EXP_OUTPUTS=$RUNS/outputs WANDB_MODE=offline MPLBACKEND=Agg
  for ds in $datasets; do ls -d "$RUNS/$part/${ds}_"*/ 2>/dev/null || true; done | xargs -r -P "$PAR" -I{} bash -c \
    'python evaluate.py sweep={} evaluator=quadrature num_threads=1 >> {}.eval.log 2>&1; echo "$(date -u +%FT%TZ) evaluated {} rc=$?" >> '"$RUNS/$part"'/progress.log'
  exit 0
fi

part=${1:?usage: runs.sh <part> [commit]}
commit=${2:-7359012}
RUNS=${RUNS:-/work/runs/$commit}

mapa_family="mapa mapa_gt mapa_naive"
seeds="'seed=range(3)'"

commands() {
  local ds m
  case "$1" in
    density)    # part 1: the MAPA family, both K fractions, S in {1, 10, 50}, R = D = 3 (draws 0-2); a sweep
                # per K fraction (three stacks), so that the two lanes stay busy to a data set's end
      for ds in $datasets; do for m in $mapa_family; do for kf in 0.1 0.5; do
        echo "$ds/$m/k$kf experiment=paper_density dataset=$ds method=$m method.K_fraction=$kf method.S=1,10,50 $seeds 'dataset.draw=range(3)'"
      done; done; done ;;
    draws34)    # part 2: draws 3 and 4 of every method (D = 5 with part 1 and the committed VAE/IWAE draws 0-2)
      for ds in $datasets; do
        for m in $mapa_family; do
          echo "$ds/$m experiment=paper_density dataset=$ds method=$m method.K_fraction=0.1,0.5 method.S=1,10,50 $seeds 'dataset.draw=range(3,5)'"
        done
        echo "$ds/vae_iwae experiment=paper_density dataset=$ds method=vae,iwae method.S=1,10,50 $seeds 'dataset.draw=range(3,5)'"
      done ;;
    bandwidth)  # part 3: MAPA's kernel bandwidth on every data set, S = 10, K = 5, R = D = 3
      for ds in $datasets; do
        echo "$ds/lo experiment=bandwidth dataset=$ds method=mapa method.bandwidth=0.0025,0.005,0.01 $seeds 'dataset.draw=range(3)'"
        echo "$ds/hi experiment=bandwidth dataset=$ds method=mapa method.bandwidth=0.02,0.04,0.08 $seeds 'dataset.draw=range(3)'"
      done ;;
    aggressive) # the sixth method (He et al. 2019) at the density scale, S in {1, 10}
      for ds in $datasets; do
        echo "$ds/aggressive experiment=paper_density dataset=$ds method=aggressive method.S=1,10 $seeds 'dataset.draw=range(3)'"
      done ;;
    *) echo "unknown part '$1' (density | draws34 | bandwidth | aggressive)" >&2; return 2 ;;
  esac
}

if [ "$part" = list ]; then for p in density draws34 bandwidth aggressive; do commands $p | sed "s/^/$p /"; done; exit 0; fi
commands "$part" >/dev/null  # a bad part name stops here

cd "$(tree_of "$commit")"
. .venv/bin/activate
mkdir -p "$RUNS/$part"
export MAPA_EXP_OUTPUTS=$RUNS/outputs WANDB_MODE=offline MPLBACKEND=Agg
commands "$part" | while read -r name args; do printf '%s\0' "$name $args"; done |
  xargs -0 -P "$PAR" -I{} bash -c '
    set -- {}; name=$1; shift
    dir='"$RUNS/$part"'/${name//\//_}
    log=$dir.log
    echo "$(date -u +%FT%TZ) start $name" >> '"$RUNS/$part"'/progress.log
    python train.py -m stack=true evaluate=false "$@" hydra.sweep.dir=$dir >> "$log" 2>&1
    echo "$(date -u +%FT%TZ) end $name rc=$?" >> '"$RUNS/$part"'/progress.log'
