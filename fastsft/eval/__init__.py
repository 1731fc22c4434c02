"""Evaluation: what tells a user whether SFT worked.

The interface the training driver and `fastsft eval` call:

    evaluate_model(model, tokenizer, tasks, *, max_problems=None, max_new_tokens=256, num_samples=1,
                   temperature=0.0, batch_size=32, device=None) -> dict[str, float]

- tasks: a dict name -> fastsft.data Task, or a comma list of names (`ARC-Easy, ARC-Challenge, MMLU, GSM8K,
  HumanEval, arithmetic, letter-count, spell`, see fastsft.eval.tasks) or data specs.
- Categorical tasks (eval_type "categorical": ARC, MMLU): prompts of different lengths go through one packed
  forward per batch (`batch_size` prompts, capped by tokens) and the answer is the best of the allowed letters.
- Generative tasks (GSM8K, HumanEval, synthetic): `num_samples` completions per problem from fastsft.engine
  (temperature, `max_new_tokens`, seeded by the problem index, calculator tool on), scored by `task.evaluate`
  (HumanEval in the sandbox of fastsft.execution).
- Returned keys, per task NAME: NAME/accuracy (pass@1), NAME/centered ((acc - baseline) / (1 - baseline), baseline
  1/letters for categorical, 0 for generative), NAME/problems, NAME/seconds, NAME/multi_turn_accuracy (the task's
  problem asked third in a 3-turn conversation, after two other problems with their reference answers; first 50
  problems), and for generative tasks NAME/stop_rate (share of generations ending with <|assistant_end|> within
  the budget; <|bos|> ends a generation but does not count), NAME/mean_answer_tokens, NAME/pass@k when num_samples = k > 1. "chatcore": the mean of the
  centered accuracies (nanochat's ChatCORE form).
- max_problems: evenly spaced problems over each task (all when None). Under torch.distributed (initialized) the
  problems are strided over ranks and the counts all-reduced, so every rank returns the same dict.
- Works on a model in train mode (eval inside, restored after), on CPU and CUDA (fp32 weights decode under bf16
  autocast on CUDA); device defaults to the model's.
"""

from fastsft.eval.harness import MULTI_TURN_PROBLEMS, evaluate_model, format_metrics, multi_turn, select_problems
from fastsft.eval.generative import pass_at_k
from fastsft.eval.loading import checkpoint_dir, load_for_inference
from fastsft.eval.tasks import EVAL_TASKS, resolve_tasks, task_spec

__all__ = ["EVAL_TASKS", "MULTI_TURN_PROBLEMS", "checkpoint_dir", "evaluate_model", "format_metrics",
           "load_for_inference", "multi_turn", "pass_at_k", "resolve_tasks", "select_problems", "task_spec"]
