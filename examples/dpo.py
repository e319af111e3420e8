"""Preference tuning with TRL's DPOTrainer and an ISaeRFT adapter (the reference model is the same model with the
adapter disabled: no second copy in memory), then `isaerft report` on the result."""

import trl
from common import parser, setup, train_and_report, training_kwargs
from datasets import Dataset

args = parser(__doc__).parse_args()
model, tokenizer, config = setup(args)
pairs = Dataset.from_dict(
    {"prompt": ["is the sea calm? "] * 16, "chosen": ["yes, calm and blue."] * 16, "rejected": ["no, stormy!"] * 16}
)
trainer = trl.DPOTrainer(
    model=model,
    ref_model=None,
    args=trl.DPOConfig(**training_kwargs(args)),
    train_dataset=pairs,
    processing_class=tokenizer,
    peft_config=config,
)
train_and_report(trainer, args)
