"""Reinforcement learning with TRL's GRPOTrainer and an ISaeRFT adapter, then `isaerft report`: which features did
RL push?"""

import trl
from common import parser, setup, train_and_report, training_kwargs
from datasets import Dataset

args = parser(__doc__).parse_args()
model, tokenizer, config = setup(args)


def reward_sea(completions, **kwargs):
    """Reward answers that talk about the sea."""
    return [
        float(sum(str(c).lower().count(w) for w in ("sea", "wave", "boat"))) + 0.01 * len(set(str(c)))
        for c in completions
    ]


prompts = Dataset.from_dict({"prompt": ["tell me a story: ", "describe your day: "] * 8})
trainer = trl.GRPOTrainer(
    model=model,
    reward_funcs=reward_sea,
    args=trl.GRPOConfig(**training_kwargs(args), num_generations=4, max_completion_length=16, generation_batch_size=8),
    train_dataset=prompts,
    processing_class=tokenizer,
    peft_config=config,
)
train_and_report(trainer, args)
