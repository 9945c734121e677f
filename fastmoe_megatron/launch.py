"""Run a Megatron-LM training script with ``--fmoefy``, without changing the checkout.

    torchrun --nproc-per-node 8 -m fastmoe_megatron.launch \\
        /path/to/Megatron-LM/pretrain_gpt.py <Megatron-LM flags> \\
        --fmoefy --fmoe-num-experts 8 --fmoe-top-k 2 --balance-strategy gshard \\
        [--expert-model-parallel-size 8]

(``scripts/pretrain_megatron_lm.sh CHECKOUT ARGS...`` wraps this in torchrun.)

The launcher puts the script's folder first on ``sys.path`` (as ``python SCRIPT`` does, so that
``megatron`` is the checkout's), replaces a few Megatron-LM functions
(``fastmoe_megatron.megatron.megatron_lm``; ``--list-patches`` lists them with the versions they
were checked against), then runs the script as ``__main__`` with the remaining arguments. The
script parses its own arguments; the patches add the flags below to its parser and act only when
``--fmoefy`` is given (any of the other flags without it is an error). An unchecked Megatron-LM
version, or a checkout that already carries the source patch, stops with one line and status 2
before anything is patched (``FMOE_MEGATRON_UNCHECKED=1`` tries an unchecked version anyway).

--fmoefy flags (Megatron-LM's ``--help`` lists them too, in the group
"fastmoe-megatron (MoE through --fmoefy)"):

  --fmoefy                          replace every transformer layer's MLP with a fastmoe_megatron
                                    MoE layer (megatron-core GPT, and legacy GPT through
                                    --use-legacy-models)
  --fmoe-num-experts N              experts per layer over all expert-parallel ranks (required)
  --fmoe-top-k K                    experts per token (default 2); alias --top-k where the script
                                    has no sampling --top_k (pretrain_gpt.py has none)
  --balance-strategy S              gate: naive (default), noisy, gshard, switch, dc, swipe
  --balance-loss-weight W           weight of the balance loss (default 1)
  --hidden-hidden-size H            hidden width of each expert (default --ffn-hidden-size)
  --fmoe-capacity-factor F          capacity factor of the gshard, switch and dc gates
  --fmoe-z-loss-weight W            router z-loss weight (default 0)
  --fmoe-expert-bias-update-rate R  aux-loss-free balancing: expert-bias step per iteration

Megatron-LM's own flags that matter with --fmoefy:

  --expert-model-parallel-size EP   experts are spread over EP ranks, replicated over the rest of
                                    the data-parallel group. Default 1 (Megatron's default: every
                                    rank holds all experts), unlike FastMoE, whose default was the
                                    whole data-parallel group. Must divide --fmoe-num-experts.
  --expert-tensor-parallel-size     must be 1 (it is set to 1 when not given)
  --num-experts                     Megatron's own MoE: not together with --fmoefy

Not with --fmoefy: --use-torch-fsdp2, --use-megatron-fsdp, --init-model-with-meta-device.
The balance loss reaches the gates through backward, scaled per step; the step's mean balance
loss is logged as "balance loss" next to "lm loss".
"""
from __future__ import annotations

import os
import runpy
import sys

# What Megatron-LM's training code imports beyond megatron-core (the megatron-lm extra).
MEGATRON_LM_EXTRA = ("six", "pydantic")
USAGE = ("usage: python -m fastmoe_megatron.launch [-h] [--list-patches] SCRIPT [ARGS ...]\n"
         "       (under torchrun: torchrun [torchrun options] -m fastmoe_megatron.launch SCRIPT "
         "ARGS ...)")


def _list_patches() -> int:
    from fastmoe_megatron.megatron import megatron_lm

    for patch in megatron_lm.describe():
        print(f"{patch['target']}\n    checked: Megatron-LM {', '.join(patch['checked'])}\n"
              f"    {patch['why']}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__)
        return 0 if argv else 2
    if argv[0] == "--list-patches":
        return _list_patches()
    if argv[0].startswith("-"):
        print(f"{USAGE}\nfastmoe_megatron.launch: unknown option {argv[0]!r} (the training "
              "script comes first; its flags, --fmoefy included, follow it)", file=sys.stderr)
        return 2
    script, script_args = os.path.abspath(argv[0]), argv[1:]
    if not os.path.isfile(script):
        print(f"fastmoe_megatron.launch: no such script: {script}", file=sys.stderr)
        return 2
    # As `python SCRIPT` does: the script's folder (the checkout) first, so that `megatron` (and
    # the script's own imports: model_provider, gpt_builders) come from the checkout.
    sys.path.insert(0, os.path.dirname(script))
    from fastmoe_megatron.megatron import megatron_lm

    try:
        patched = megatron_lm.apply()
        import torch

        if torch.cuda.is_available():
            # As pretrain_gpt does: megatron-core's gaps on a GPU without Transformer Engine or
            # Apex (a --use-distributed-optimizer resume with torch Adam); a no-op with them.
            from fastmoe_megatron.megatron import te_compat

            patched += te_compat.apply()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"fastmoe_megatron.launch: Megatron-LM {megatron_lm.megatron_lm_version()}: "
                  "patched " + ", ".join(t.rpartition(":")[2] for t in patched), flush=True)
        sys.argv = [script, *script_args]
        runpy.run_path(script, run_name="__main__")
    except ModuleNotFoundError as e:
        # The traceback follows (re-raised); this says what to install, and where.
        if (e.name or "").partition(".")[0] in MEGATRON_LM_EXTRA:
            how = (f"Megatron-LM's training code imports {' and '.join(MEGATRON_LM_EXTRA)} besides "
                   "megatron-core: pip install 'fastmoe-megatron[megatron-lm]' (or pip install "
                   f"{' '.join(MEGATRON_LM_EXTRA)}); scripts/setup.sh installs them")
        else:
            how = "install it there"
        print(f"fastmoe_megatron.launch: {script} needs the module {e.name!r}, which is not "
              f"installed in {sys.prefix}. {how}.", file=sys.stderr, flush=True)
        raise
    except megatron_lm.UnsupportedMegatronLM as e:
        # An unchecked version, a checkout that already carries the source patch, a missing
        # target: every rank stops here, so one line per node (no traceback), status 2.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"fastmoe_megatron.launch: {str(e).removeprefix('fastmoe_megatron: ')}",
                  file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
