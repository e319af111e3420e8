"""Unlearning with a clamp adapter: the plain transformers Trainer with a gradient-difference loss (raise the loss on
the forget texts, keep it on the retain texts), then `isaerft report` names the clamped features.

The clamp pulls a few SAE latents, where they fire, towards learned (possibly negative) values; `l1_coeff` keeps the
gate sparse, so the report is a short list of "latent i, when above a, pulled to c".
"""

import torch
from common import parser, setup, train_and_report
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_isaerft import ISaeRFTConfig

FORGET = ["the boat sails on the sea.", "waves break on the shore.", "the sailor loves the sea."]
RETAIN = ["the cat sleeps on the mat.", "bread is baked in the oven.", "the train leaves at noon."]


class GradientDifference(Trainer):
    """Loss = mean NLL on retain rows - mean NLL on forget rows (each row says which it is)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = inputs.pop("forget").bool()
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1].float()
        targets = labels[:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                      reduction="none")
        per_row = per_token.sum(-1) / (targets != -100).sum(-1).clamp_min(1)
        retain = per_row[~forget].mean() if (~forget).any() else per_row.new_zeros(())
        forget_loss = per_row[forget].mean() if forget.any() else per_row.new_zeros(())
        loss = retain - forget_loss
        return (loss, outputs) if return_outputs else loss


args = parser(__doc__).parse_args()
model, tokenizer, config = setup(args)
peft_model = get_peft_model(model, ISaeRFTConfig(saes=config.saes, component="clamp", l1_coeff=1e-3))
texts = FORGET * 4 + RETAIN * 4
encoded = tokenizer(texts, padding="max_length", max_length=32, truncation=True)
labels = [[t if m else -100 for t, m in zip(ids, mask, strict=True)]
          for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)]
data = Dataset.from_dict({**encoded, "labels": labels, "forget": [1] * (4 * len(FORGET)) + [0] * (4 * len(RETAIN))})
trainer = GradientDifference(
    model=peft_model,
    args=TrainingArguments(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=6,
                           learning_rate=5e-2, report_to=[], use_cpu=not torch.cuda.is_available(),
                           remove_unused_columns=False, save_strategy="no"),
    train_dataset=data,
)
train_and_report(trainer, args)
