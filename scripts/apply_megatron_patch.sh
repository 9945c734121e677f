#!/usr/bin/env bash
# Applies patches/megatron-lm-core_v0.16.1.patch (the --fmoefy hooks) to a Megatron-LM checkout.
#
#   scripts/apply_megatron_patch.sh CHECKOUT            verify CHECKOUT, check, apply
#   scripts/apply_megatron_patch.sh CHECKOUT --clone    first clone Megatron-LM into CHECKOUT
#                                                       (a new folder) at core_v0.16.1
#   scripts/apply_megatron_patch.sh CHECKOUT --check    verify and `git apply --check` only
#
# A checkout that already carries the patch (committed or not) is reported and left as it is
# (exit 0). Otherwise it refuses (exit 1, nothing changed) when CHECKOUT is not a git checkout, its
# HEAD is not core_v0.16.1 (commit 55ac7082517c3878ae653c07c09c534b8aed49f6) or a commit built on
# it (a fork), it has changes to tracked files, or `git apply --check` fails.
#
# Environment: MEGATRON_LM_REPO  where --clone clones from
#                                (default https://github.com/NVIDIA/Megatron-LM.git)
#
# Afterwards the checkout's own scripts take --fmoefy, with fastmoe_megatron importable
# (pip install -e /path/to/fastmoe-megatron, or PYTHONPATH):
#   torchrun --nproc-per-node 8 CHECKOUT/pretrain_gpt.py ... --fmoefy --fmoe-num-experts 8
set -euo pipefail

TAG=core_v0.16.1
COMMIT=55ac7082517c3878ae653c07c09c534b8aed49f6
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PATCH="$ROOT/patches/megatron-lm-$TAG.patch"

die() { echo "apply_megatron_patch: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: $0 CHECKOUT [--clone|--check]"
CHECKOUT="$1"; MODE="${2:-apply}"
case "$MODE" in apply|--clone|--check) ;; *) die "unknown option '$MODE' (--clone or --check)";; esac
[ -f "$PATCH" ] || die "missing $PATCH"

if [ "$MODE" = --clone ]; then
    [ ! -e "$CHECKOUT" ] || die "$CHECKOUT exists; --clone makes a new checkout (drop --clone to patch an existing one)"
    REPO="${MEGATRON_LM_REPO:-https://github.com/NVIDIA/Megatron-LM.git}"
    echo "apply_megatron_patch: cloning $REPO at $TAG into $CHECKOUT"
    git clone --quiet --no-checkout "$REPO" "$CHECKOUT"
    git -C "$CHECKOUT" fetch --quiet origin "refs/tags/$TAG:refs/tags/$TAG" 2>/dev/null || true
    git -C "$CHECKOUT" -c advice.detachedHead=false checkout --quiet "$COMMIT" \
        || die "$REPO has no commit $COMMIT ($TAG)"
fi

[ -d "$CHECKOUT" ] || die "no such folder: $CHECKOUT"
git -C "$CHECKOUT" rev-parse --git-dir >/dev/null 2>&1 \
    || die "$CHECKOUT is not a git checkout (the patch needs Megatron-LM's git history to verify it)"
TOP="$(git -C "$CHECKOUT" rev-parse --show-toplevel)"
[ -f "$TOP/pretrain_gpt.py" ] && [ -f "$TOP/megatron/training/training.py" ] \
    || die "$TOP does not look like Megatron-LM (no pretrain_gpt.py / megatron/training/training.py)"

if git -C "$TOP" apply --reverse --check "$PATCH" >/dev/null 2>&1; then
    echo "apply_megatron_patch: $TOP already carries the patch; nothing to do"
    exit 0
fi

HEAD="$(git -C "$TOP" rev-parse HEAD)"
if [ "$HEAD" != "$COMMIT" ]; then
    DESC="$(git -C "$TOP" describe --tags --always HEAD 2>/dev/null || echo "$HEAD")"
    if git -C "$TOP" merge-base --is-ancestor "$COMMIT" HEAD 2>/dev/null; then
        echo "apply_megatron_patch: $TOP is at $DESC, a commit built on $TAG; the patch is made for $TAG, so git apply --check decides"
    else
        die "$TOP is at $DESC ($HEAD), which is neither $TAG ($COMMIT) nor built on it. The patch is for $TAG only: check out $TAG (git -C '$TOP' checkout $TAG), or use the launcher (python -m fastmoe_megatron.launch), see patches/README.md"
    fi
fi

if ! git -C "$TOP" diff --quiet HEAD --; then
    git -C "$TOP" status --short --untracked-files=no >&2
    die "$TOP has changes to tracked files (above): commit or stash them first"
fi

git -C "$TOP" apply --check "$PATCH" || die "git apply --check failed: the patch does not apply to $TOP"
echo "apply_megatron_patch: git apply --check: the patch applies cleanly to $TOP ($TAG)"
[ "$MODE" = --check ] && exit 0

git -C "$TOP" apply "$PATCH"
git -C "$TOP" apply --reverse --check "$PATCH" >/dev/null 2>&1 || die "the patch did not apply as expected"
echo "apply_megatron_patch: applied $(basename "$PATCH") to $TOP:"
git -C "$TOP" diff --stat | sed 's/^/    /'
