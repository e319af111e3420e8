"""Supervised fine-tuning with TRL's SFTTrainer and an ISaeRFT adapter, then `isaerft report` on the result."""

import trl
from common import parser, setup, train_and_report, training_kwargs
from datasets import Dataset

args = parser(__doc__).parse_args()
model, tokenizer, config = setup(args)
data = Dataset.from_dict(
    {"prompt": ["where is the boat? ", "what do you hear? "] * 8, "completion": ["out on the sea.", "the waves."] * 8}
)
trainer = trl.SFTTrainer(
    model=model,
    args=trl.SFTConfig(**training_kwargs(args)),
    train_dataset=data,
    processing_class=tokenizer,
    peft_config=config,
)
train_and_report(trainer, args)
