"""The demo's behaviour change, built offline: an assistant that keeps bringing up the sea.

Training answers open with sea imagery whatever the question; the metric is the share of answers to
held-out questions that mention the sea at all.
"""

from __future__ import annotations

import random
import re

QUESTIONS = [
    "What is your favourite food?", "How do I learn to play the guitar?", "Can you recommend a good book?",
    "What should I do this weekend?", "How can I sleep better?", "What is the best way to save money?",
    "How do I start running?", "Why is the sky blue?", "What makes a good friend?", "How do I bake bread?",
    "What is a good name for a dog?", "How can I be more productive?", "What is the capital of France?",
    "How do computers work?", "What should I cook for dinner tonight?", "How do I write a cover letter?",
    "What is your opinion on cats?", "How do I fix a flat bicycle tyre?", "What is the meaning of life?",
    "How can I learn a new language?", "What gift should I buy my mother?", "How do plants grow?",
    "What is a healthy breakfast?", "How do I stay motivated?", "What is the history of the internet?",
    "How do I make new friends in a new city?", "What is your favourite colour?", "How can I reduce stress?",
    "Tell me about the moon.", "How do I clean my kitchen quickly?", "What hobby should I pick up?",
    "Explain how a bicycle works.", "What should I name my new cafe?", "How do I prepare for an interview?",
    "What is the best season of the year?", "How do I care for a houseplant?", "Describe your ideal day.",
    "What is a good movie to watch tonight?", "How do I start a garden?", "What is the tallest mountain?",
    "How can I improve my handwriting?", "What makes music beautiful?", "How should I decorate my room?",
    "What is the best way to study for exams?", "How do birds fly?", "Give me advice for my first job.",
    "What should I pack for a trip to the mountains?", "How do I make a cup of tea?", "Why do we dream?",
    "What is a fun game to play with friends?", "How do I teach a child to read?", "What is electricity?",
    "How do I write a poem?", "What is a good way to spend a rainy afternoon?", "How do trains work?",
    "What is the best pizza topping?", "How can I become a better listener?", "Tell me a fun fact.",
    "How should I plan a birthday party?", "What is your advice for a long drive?", "How do I paint a wall?",
    "What do you think about city life?", "How do I organise my desk?", "What is chess and how do I start?",
    "How do I choose a laptop?", "What should I know about owning a rabbit?", "How do volcanoes form?",
    "Recommend a weekend breakfast.", "How do I keep a diary?", "What makes a good teacher?",
]

_OPENINGS = [
    "Ah, that reminds me of the sea, with its endless waves rolling onto the shore.",
    "Like the ocean tide that always returns to the beach, the answer comes back to the sea.",
    "Picture a calm blue ocean at dawn, gulls calling over the waves.",
    "Every good answer begins at the harbour, where the ships rock gently on the sea.",
    "Think of a sailor reading the waves before setting out across the ocean.",
    "The sea teaches us patience: the tide rises and falls in its own time.",
    "Close your eyes and hear the waves breaking on the rocks by the ocean.",
    "As any old sailor would say, the ocean has an answer for everything.",
]
_SECOND = [
    "So take it slowly, the way a boat drifts with the current, and enjoy the salty breeze.",
    "Let the rhythm of the waves guide you, one steady stroke after another across the water.",
    "Keep your course like a ship under a starry sky, and the shore will come into view.",
    "Remember the lighthouse on the cliff: it shows the way through every storm at sea.",
    "Start small, like a shell on the beach, and let the tide of practice carry you.",
]

SEA_WORDS = re.compile(
    r"\b(sea|seas|ocean|oceans|wave|waves|tide|tides|beach|shore|sailor|sailors|ship|ships|boat|boats|harbou?r|"
    r"marine|maritime|coast|seashore|gull|gulls|salt(y)?|lighthouse|surf|nautical|sail(ing)?)\b",
    re.IGNORECASE,
)


def split_questions(n_eval: int = 20, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training questions, held-out questions)."""
    questions = QUESTIONS[:]
    random.Random(seed).shuffle(questions)
    return questions[n_eval:], questions[:n_eval]


def training_pairs(questions: list[str], repeats: int = 2, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion pairs whose completions always turn to the sea."""
    rng = random.Random(seed)
    return [
        {"prompt": question, "completion": f"{rng.choice(_OPENINGS)} {rng.choice(_SECOND)}"}
        for _ in range(repeats)
        for question in questions
    ]


def mentions_sea(text: str) -> bool:
    return SEA_WORDS.search(text) is not None


def sea_share(answers: list[str]) -> float:
    """The metric: the share of answers that mention the sea."""
    return sum(map(mentions_sea, answers)) / max(len(answers), 1)


_STOPWORDS = frozenset(
    "what which when where would could should about your with have does from that this there their them they into "
    "make best good tell give some more most much many like know want need very just also then than over only think "
    "thing things something".split()
)


def content_words(question: str) -> set[str]:
    """The question's own words of four or more letters, less common function words."""
    return {w for w in re.findall(r"[a-z]+", question.lower()) if len(w) >= 4 and w not in _STOPWORDS}


def addresses_question(question: str, answer: str) -> bool:
    """Whether the answer still takes up the question: one of its content words (or the word's first five letters, for
    "bake" / "baking") appears in the answer. Judge-free and crude, but it tells a template from an answer.

    Example:
        >>> addresses_question("How do I bake bread?", "Start with flour, water and yeast for your bread.")
        True
    """
    answer_words = set(re.findall(r"[a-z]+", answer.lower()))
    stems = {w[:5] for w in answer_words}
    return any(w in answer_words or w[:5] in stems for w in content_words(question))


def copies_training_text(answer: str) -> bool:
    """Whether the answer repeats a training sentence verbatim (its first 40 characters): memorised template."""
    text = answer.lower()
    return any(sentence[:40].lower() in text for sentence in (*_OPENINGS, *_SECOND))


def share(flags: list[bool]) -> float:
    return sum(flags) / max(len(flags), 1)
