"""A chat prompt set for speculative-decoding benchmarks, written for this project in the six Spec-Bench categories.

Each category holds 10 conversations: the first 2 are the validation split (tune tree sizes, budgets and
thresholds on them only), the other 8 the test split (report on them, with everything frozen). A conversation is a
list of chat messages ending with the user's turn; `chat_inputs` applies the model's chat template.

Categories (Spec-Bench, Xia et al., 2024, arXiv:2401.07851): multi-turn conversation, translation, summarization,
question answering, math reasoning and retrieval-augmented QA.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["CATEGORIES", "CHAT_PROMPTS", "chat_inputs", "chat_prompts"]

Split = Literal["validation", "test"]
VALIDATION_PER_CATEGORY = 2


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _turns(*texts: str) -> list[dict[str, str]]:
    """Alternating user / assistant turns, starting and ending with the user."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(texts)]


_PASSAGES = {
    "lighthouse": (
        "The Harwick lighthouse was built in 1874 on a granite outcrop two miles off the coast. Its first lamp "
        "burned whale oil and was replaced by a kerosene burner in 1902 and by an electric lamp in 1951. The "
        "station was automated in 1987, and the last keeper, Ellen Marsh, left the island that autumn."
    ),
    "cooperative": (
        "The Valley Grain Cooperative has 312 member farms. Members pay an annual fee of 150 dollars and sell "
        "at least half of their harvest through the cooperative. Profits are shared in proportion to the tonnage "
        "each farm delivered during the year. The board of seven is elected every two years."
    ),
    "library": (
        "The city library opens at 9 a.m. on weekdays and at 10 a.m. on Saturdays; it is closed on Sundays. "
        "Members may borrow up to 12 items for three weeks, renewable twice online. Late returns cost 20 cents a "
        "day per item, capped at 5 dollars. Children's books carry no late fees."
    ),
    "battery": (
        "The K7 battery pack stores 4.2 kilowatt-hours. It charges from 10 to 80 percent in 35 minutes on a fast "
        "charger and in about 5 hours on a household outlet. Its warranty covers 8 years or 2,000 full cycles, "
        "whichever comes first, provided it keeps at least 70 percent of its capacity."
    ),
    "festival": (
        "The river festival runs for three days in early June. Friday evening opens with a lantern parade; "
        "Saturday hosts the boat race, which starts at noon at the old mill; Sunday ends with a concert in the "
        "park. Entry is free, but the concert needs a ticket from the town hall."
    ),
}


def _rag(passage: str, question: str) -> list[dict[str, str]]:
    return _user(f"Answer from the document only.\n\nDocument:\n{_PASSAGES[passage]}\n\nQuestion: {question}")


_SUMMARY_TEXTS = (
    "Researchers tracked 400 commuters who switched from driving to cycling over one year. Most reported shorter "
    "and more predictable journeys after the first month, although winter weather reduced cycling by a third. "
    "Participants also lost an average of two kilograms, and sick days fell slightly compared with a control group.",
    "The town council approved a plan to convert the old railway depot into a public market. Construction begins in "
    "spring and should take fourteen months. Local farmers will get reduced rents for the first two years, and the "
    "roof will carry solar panels that cover most of the building's electricity.",
    "A software team moved its nightly tests from one large server to many small cloud machines. Test time fell from "
    "three hours to forty minutes, but costs rose by a quarter. The team now runs the full suite only on the main "
    "branch and a quick subset on every change, which brought costs back down.",
    "Beekeepers in the region reported fewer colony losses this winter than in the previous five years. Experts "
    "credit a mild autumn and a new program that lends hive scales to members, letting them see when colonies run "
    "low on food. Losses still vary widely between apiaries.",
    "The museum reopened after an eighteen-month renovation that added climate control, a larger children's wing "
    "and step-free access to every floor. Ticket prices stay the same, and entry is free on the first Sunday of each "
    "month. The old café was replaced by a rooftop terrace.",
    "A study of 1,200 small online shops found that those answering customer messages within an hour had 30 percent "
    "more repeat buyers. Faster replies mattered more than discounts. Shops using templates answered faster but were "
    "rated slightly less friendly.",
    "Heavy rain flooded the lower part of the valley last week. Volunteers filled sandbags around the school and the "
    "clinic, which stayed open. The bridge on the northern road is closed until engineers inspect it, and buses take "
    "a longer route through the hills.",
    "The orchestra will tour five cities next autumn with a program of new works by young composers. Each concert "
    "includes a short talk by the composer. Rehearsals start in July, and students can attend two of them for free.",
    "A bakery chain replaced plastic bags with paper ones and offered a discount for bringing a bag. Within six "
    "months, half of the customers brought their own. Costs for bags fell, and the chain plans to remove them "
    "from two shops entirely as a trial.",
    "The water utility found that a tenth of the city's treated water is lost to leaks. It will replace the oldest "
    "pipes first, starting with the historic center, and install sensors that detect leaks early. Customers may see "
    "short interruptions during the work.",
)

CHAT_PROMPTS: dict[str, list[list[dict[str, str]]]] = {
    "multi-turn conversation": [
        _turns(
            "I want to start running. How often should a beginner run each week?",
            "Three times a week is a good start, with a rest day between runs.",
            "How long should each of those runs be, and how fast?",
        ),
        _turns(
            "Can you suggest a name for a small bakery?",
            "How about 'The Rising Loaf'?",
            "I like it. Now write a one-line slogan for it.",
        ),
        _turns(
            "What is the difference between a list and a tuple in Python?",
            "A list is mutable; a tuple is immutable.",
            "When would I prefer a tuple then? Give two examples.",
        ),
        _turns(
            "I am planning a weekend trip to the mountains.",
            "That sounds great. Will you hike or stay in a cabin?",
            "Both. What should I pack for two days of hiking in autumn?",
        ),
        _turns(
            "My tomato plants have yellow leaves at the bottom.",
            "That is often a sign of overwatering or a lack of nitrogen.",
            "I water them every day. What should I change?",
        ),
        _turns(
            "Recommend a board game for four adults.",
            "Ticket to Ride is easy to learn and fun for four players.",
            "We played it already. Something with more strategy, please, and explain why.",
        ),
        _turns(
            "How do I make my emails shorter?",
            "Start with the request, then give only the context the reader needs.",
            "Rewrite this opening with that advice: 'I hope you are well. I am writing because I wanted to ask "
            "whether it might be possible to move our meeting.'",
        ),
        _turns(
            "What is a good way to learn new words in a foreign language?",
            "Spaced repetition with flashcards works well for most people.",
            "How many new words a day is reasonable, and how long should I review?",
        ),
        _turns(
            "I need a birthday gift for my father, who likes fishing.",
            "A good tackle box or a pair of polarized sunglasses would suit him.",
            "He has both. Give me three other ideas under fifty dollars.",
        ),
        _turns(
            "Explain what a budget is to a twelve-year-old.",
            "A budget is a plan for how you will use your money.",
            "Now give that child a simple example with pocket money of ten dollars a week.",
        ),
    ],
    "translation": [
        _user("Translate into French: 'The train to the airport leaves every twenty minutes.'"),
        _user("Translate into English: 'Der Bäcker an der Ecke öffnet schon um sechs Uhr morgens.'"),
        _user("Translate into Spanish: 'Please close the window when you leave the room.'"),
        _user("Translate into English: 'Nous avons réservé une table pour quatre personnes à huit heures.'"),
        _user("Translate into German: 'My sister works as a nurse in a large hospital.'"),
        _user("Translate into English: 'El museo está cerrado los lunes, pero abre hasta tarde los jueves.'"),
        _user("Translate into French: 'Could you tell me where the nearest pharmacy is?'"),
        _user("Translate into English: 'Ich habe meinen Regenschirm im Bus vergessen.'"),
        _user("Translate into Italian: 'We are going to the beach tomorrow if it does not rain.'"),
        _user("Translate into English: 'Il pleut depuis trois jours et la rivière a beaucoup monté.'"),
    ],
    "summarization": [_user(f"Summarize in one sentence:\n\n{text}") for text in _SUMMARY_TEXTS],
    "question answering": [
        _user("Why is the sky blue?"),
        _user("What does a compiler do?"),
        _user("How do vaccines train the immune system?"),
        _user("What is the difference between weather and climate?"),
        _user("Why do we have seasons on Earth?"),
        _user("What is photosynthesis, in simple terms?"),
        _user("How does a refrigerator keep food cold?"),
        _user("What causes tides in the ocean?"),
        _user("Why does bread rise when it is baked?"),
        _user("What is the purpose of a database index?"),
    ],
    "math reasoning": [
        _user("A shop sells pens at 3 dollars each or 4 for 10 dollars. How much do 9 pens cost at best? Explain."),
        _user("A train travels 120 km in 1.5 hours. At the same speed, how far does it go in 4 hours? Show steps."),
        _user("Anna is 3 times as old as her son. In 12 years she will be twice as old. How old is the son now?"),
        _user("A rectangle has a perimeter of 36 cm and a length twice its width. What is its area? Show steps."),
        _user("If 5 workers paint a fence in 6 hours, how long do 3 workers take at the same rate? Explain."),
        _user("A recipe uses 250 g of flour for 10 cookies. How much flour is needed for 36 cookies? Show steps."),
        _user("A price rises by 20 percent and then falls by 20 percent. Is it back to the start? Explain with 100."),
        _user("What is the sum of the whole numbers from 1 to 50? Explain a quick way to compute it."),
        _user("A tank fills in 3 hours and drains in 5 hours. With both open, how long to fill it? Show steps."),
        _user("Tom saves 15 dollars a week and has 40 dollars now. After how many weeks does he have 220? Explain."),
    ],
    "retrieval-augmented QA": [
        _rag("lighthouse", "When was the lighthouse automated, and who was its last keeper?"),
        _rag("cooperative", "How are the cooperative's profits shared among members?"),
        _rag("library", "What does it cost to return three adult books five days late?"),
        _rag("battery", "How long does the K7 take to charge from 10 to 80 percent on a fast charger?"),
        _rag("festival", "Where and when does the boat race start?"),
        _rag("lighthouse", "What fuel did the first lamp burn, and when was it replaced by kerosene?"),
        _rag("cooperative", "How often is the board elected, and how many members does it have?"),
        _rag("library", "Can a member keep a borrowed item for nine weeks? Explain."),
        _rag("battery", "What conditions does the warranty set?"),
        _rag("festival", "Which event needs a ticket, and where can it be obtained?"),
    ],
}
CATEGORIES = tuple(CHAT_PROMPTS)


def chat_prompts(category: str, split: Split = "test") -> list[list[dict[str, str]]]:
    """The conversations of `category` in `split` (`"validation"`: 2 per category, `"test"`: 8)."""
    if category not in CHAT_PROMPTS:
        raise ValueError(f"unknown category {category!r}; choose one of {list(CATEGORIES)}")
    if split not in ("validation", "test"):
        raise ValueError(f"split={split!r} must be 'validation' or 'test'")
    conversations = CHAT_PROMPTS[category]
    return (
        conversations[:VALIDATION_PER_CATEGORY] if split == "validation" else conversations[VALIDATION_PER_CATEGORY:]
    )


def chat_inputs(tokenizer, conversations: list[dict[str, str]] | list[list[dict[str, str]]]) -> dict:
    """`input_ids` and `attention_mask` `(B, L)` of one conversation (B = 1) or a list of them, through the
    tokenizer's chat template, left-padded (as `generate` expects for a batch)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "this tokenizer has no chat template; use a chat model such as reference_model('smollm2-135m')"
        )
    if conversations and isinstance(conversations[0], dict):  # a single conversation
        conversations = [conversations]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
