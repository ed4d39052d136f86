"""lm-evaluation-harness's own command line with dllmq's model class registered.

lm-eval discovers model classes only from modules that have been imported, so `lm_eval --model dllmq`
alone cannot find ours. This entry point imports it first and adds the bundled tasks (tiny-math, tiny-code,
tiny-mc) to lm-eval's task index, then hands over to lm-eval unchanged:

    dllmq-lm-eval --model dllmq --model_args pretrained=tiny,mc_num=8 --tasks tiny-mc --limit 4

    dllmq-lm-eval --model dllmq --model_args pretrained=./llada-w4,mc_num=128 --tasks arc_easy
    accelerate launch -m dllmq.evaluation.lm_eval_cli --model dllmq --model_args pretrained=./llada-w4 --tasks gsm8k
"""

from __future__ import annotations


def main() -> None:
    from . import harness  # registers the "dllmq" model class
    from lm_eval.__main__ import cli_evaluate

    harness.include_tiny_tasks()  # the bundled tiny-math, tiny-code, tiny-mc, next to --include_path's tasks
    try:  # lm-eval's `git describe` probe prints git's "fatal: not a git repository" outside a checkout
        import lm_eval.evaluator as lm_evaluator

        lm_evaluator.get_git_commit_hash = harness._quiet_git_hash
    except (ImportError, AttributeError):
        pass
    cli_evaluate()


if __name__ == "__main__":
    main()
