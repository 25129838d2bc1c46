#!/usr/bin/env bash
# Circuit-discovery methods side by side: for every model x task, score every edge with each method
# (stage=discover: eap, eap-ig, exact, acc), evaluate the faithfulness curve / CPR / CMD of each
# (stage=evaluate), compare the circuits with each other and the literature (stage=compare_methods),
# then gather every run's CPR/CMD into one table and figure (stage=gather_methods, one job).
# acc needs ACC's pruned graphs in the same run dirs (sweeps/paper.sh, or stage=pipeline, first);
# exact patches every edge alone: keep it for toy and tiny models (EXACT_MODELS).
#   MODELS=gpt2-small,pythia-160m TASKS=ioi,gt,gp sweeps/methods.sh [extra overrides]
#   LAUNCHER=local GPUS=0 MODELS=toy-ioi TASKS=ioi EXACT_MODELS=toy-ioi sweeps/methods.sh task.n_prompts=16
source "$(dirname "$0")/common.sh"
MODELS=${MODELS:-gpt2-small,pythia-160m}
TASKS=${TASKS:-ioi,gt,gp}
METHODS=${METHODS:-eap,eap-ig,acc}
EXACT_MODELS=${EXACT_MODELS:-}          # comma-separated models that also get method=exact
EXACT_TASKS=${EXACT_TASKS:-$TASKS}
ABLATIONS=${ABLATIONS:-patching}        # evaluate.ablation values: patching,mean,zero
GROUP=${GROUP:-methods}

TIME_MIN=${TIME_MIN:-120} acc_multirun "model=$MODELS" "task=$TASKS" stage=discover "method=$METHODS" "$@"
TIME_MIN=${TIME_MIN:-120} acc_multirun "model=$MODELS" "task=$TASKS" stage=evaluate "method=$METHODS" \
    "evaluate.ablation=$ABLATIONS" "$@"
if [ -n "$EXACT_MODELS" ]; then
    TIME_MIN=${TIME_MIN:-240} acc_multirun "model=$EXACT_MODELS" "task=$EXACT_TASKS" stage=discover method=exact "$@"
    TIME_MIN=${TIME_MIN:-120} acc_multirun "model=$EXACT_MODELS" "task=$EXACT_TASKS" stage=evaluate method=exact \
        "evaluate.ablation=$ABLATIONS" "$@"
    METHODS="$METHODS,exact"
fi
GPUS=0 TIME_MIN=${TIME_MIN:-30} acc_multirun "model=$MODELS" "task=$TASKS" stage=compare_methods \
    "compare_methods.methods=[${METHODS}]" device=cpu "$@"
# one job: every run's CPR/CMD under paths.root as one table and figure (wandb: one table)
GPUS=0 TIME_MIN=${TIME_MIN:-30} acc_multirun stage=gather_methods device=cpu "$@"
