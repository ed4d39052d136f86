"""lm-evaluation-harness's own command line with dllmq's model class registered.

lm-eval discovers model classes only from modules that have been imported, so `lm_eval --model dllmq`
alone cannot find ours. This entry point imports it first, then hands over to lm-eval unchanged:

    dllmq-lm-eval --model dllmq --model_args pretrained=./llada-w4,mc_num=128 --tasks arc_easy
    accelerate launch -m dllmq.evaluation.lm_eval_cli --model dllmq --model_args pretrained=./llada-w4 --tasks gsm8k
"""

from __future__ import annotations


def main() -> None:
    from . import harness  # noqa: F401  (registers the "dllmq" model class)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
