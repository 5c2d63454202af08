"""``topics``: a small built-in text-classification task (which of four topics a sentence is about).

Sentences come from templates filled with words of one topic; the label is the topic. It exists so
the default run and the tests have a task whose answer is in the words themselves, which even
randomly initialised stand-in backbones expose in their features.
"""

from __future__ import annotations

import random

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

TOPICS = {
    "animals": ["cat", "dog", "horse", "sparrow", "otter", "tiger", "whale", "rabbit", "eagle", "lizard"],
    "colors": ["red", "blue", "green", "yellow", "violet", "orange", "crimson", "teal", "amber", "grey"],
    "numbers": ["seven", "twelve", "forty", "three", "ninety", "eleven", "hundred", "fifteen", "eight", "six"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "noodles", "butter", "pepper", "honey", "cake"],
}
TEMPLATES = [
    "I keep thinking about the {a} and the {b}.",
    "Yesterday we talked about {a}, then {b}.",
    "{A} is what she wrote, next to {b}.",
    "The list said {a}, {b} and nothing more.",
    "Do you remember the {a}? And the {b}?",
    "Everyone agreed: {a} first, {b} later.",
]


def topics_dataset(num_train: int = 2000, num_eval: int = 400, seed: int = 0) -> DatasetDict:
    """Generate the ``topics`` task; train and validation use disjoint template/word draws of one seed."""
    rng = random.Random(seed)
    names = list(TOPICS)

    def draw(n):
        rows = {"text": [], "label": []}
        for _ in range(n):
            label = rng.randrange(len(names))
            a, b = rng.sample(TOPICS[names[label]], 2)
            rows["text"].append(rng.choice(TEMPLATES).format(a=a, b=b, A=a.capitalize()))
            rows["label"].append(label)
        return rows

    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict(train=Dataset.from_dict(draw(num_train), features=features),
                       validation=Dataset.from_dict(draw(num_eval), features=features))
