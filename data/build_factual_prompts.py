"""Build data/factual_prompts.csv: candidate facts for causal tracing, checked against the embedded model.

Every candidate is a (category, relation, subject, prompt, answer_text) written by hand so that the next
token after the prompt starts the answer ("The Eiffel Tower is located in the city of" -> " Paris"). For
each candidate this script records

* ``answer``: the first token of ``answer_text`` under SmolLM2-135M-Instruct's tokenizer (a single-token
  string with its leading space; for most facts it is the whole answer);
* ``smollm2_top1`` / ``smollm2_p_answer``: the model's top-1 next token and the answer's probability;
* ``kept_smollm2_135m``: True when the top-1 next token is the answer.

All candidates stay in the CSV (so another model can be filtered from the same list, see
``mechfin_utils.tasks.facts.load_factual_prompts``); the kept ones are what the causal-tracing notebook
uses for SmolLM2. Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python data/build_factual_prompts.py            # (re)write the file
    HF_HUB_OFFLINE=1 .venv/bin/python data/build_factual_prompts.py --check    # exit 1 if a rebuild differs

It prints how many candidates were tried and kept (overall and per category); the data card
(data/README.md, "Factual prompts") quotes those numbers.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import csv_build
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "data" / "factual_prompts.csv"

CAPITAL = "The capital of {s} is"
LANDMARK = "The {s} is located in the city of"
FOUNDER = "{s} was founded by"
HQ = "The headquarters of {s} are in the city of"
MAKER = "{s} is made by the company"
LANGUAGE = "The official language of {s} is"
CURRENCY = "The currency of {s} is the"
SPORT = "{s} is famous for playing the sport of"
INSTRUMENT = "{s} was famous for playing the"
AUTHOR = "{s} was written by"

# (category, relation template, subject, answer_text)
CANDIDATES: list[tuple[str, str, str, str]] = [
    # capitals
    *[
        ("capital", CAPITAL, s, a)
        for s, a in [
            ("France", " Paris"),
            ("Germany", " Berlin"),
            ("Italy", " Rome"),
            ("Spain", " Madrid"),
            ("Japan", " Tokyo"),
            ("China", " Beijing"),
            ("Russia", " Moscow"),
            ("the United Kingdom", " London"),
            ("Canada", " Ottawa"),
            ("Australia", " Canberra"),
            ("Egypt", " Cairo"),
            ("Greece", " Athens"),
            ("Portugal", " Lisbon"),
            ("Ireland", " Dublin"),
            ("Austria", " Vienna"),
            ("Norway", " Oslo"),
            ("Sweden", " Stockholm"),
            ("Finland", " Helsinki"),
            ("Denmark", " Copenhagen"),
            ("Poland", " Warsaw"),
            ("Hungary", " Budapest"),
            ("the Czech Republic", " Prague"),
            ("Turkey", " Ankara"),
            ("India", " New Delhi"),
            ("Thailand", " Bangkok"),
            ("South Korea", " Seoul"),
            ("Kenya", " Nairobi"),
            ("Peru", " Lima"),
            ("Argentina", " Buenos Aires"),
            ("Cuba", " Havana"),
            ("Iran", " Tehran"),
            ("Iraq", " Baghdad"),
            ("Belgium", " Brussels"),
            ("the Netherlands", " Amsterdam"),
            ("Chile", " Santiago"),
            ("Venezuela", " Caracas"),
            ("Vietnam", " Hanoi"),
            ("the Philippines", " Manila"),
            ("Indonesia", " Jakarta"),
            ("Romania", " Bucharest"),
            ("Iceland", " Reykjavik"),
            ("Scotland", " Edinburgh"),
            ("Saudi Arabia", " Riyadh"),
            ("Afghanistan", " Kabul"),
            ("Lebanon", " Beirut"),
            ("Syria", " Damascus"),
        ]
    ],
    # landmarks
    *[
        ("landmark", LANDMARK, s, a)
        for s, a in [
            ("Eiffel Tower", " Paris"),
            ("Colosseum", " Rome"),
            ("Big Ben clock tower", " London"),
            ("Statue of Liberty", " New York"),
            ("Golden Gate Bridge", " San Francisco"),
            ("Brandenburg Gate", " Berlin"),
            ("Kremlin", " Moscow"),
            ("Louvre Museum", " Paris"),
            ("Taj Mahal", " Agra"),
            ("Forbidden City", " Beijing"),
            ("Acropolis", " Athens"),
            ("Sagrada Familia", " Barcelona"),
            ("Space Needle", " Seattle"),
            ("Empire State Building", " New York"),
            ("Buckingham Palace", " London"),
            ("Tower Bridge", " London"),
            ("Burj Khalifa", " Dubai"),
            ("Petronas Towers", " Kuala Lumpur"),
            ("CN Tower", " Toronto"),
            ("Alhambra palace", " Granada"),
            ("Parthenon", " Athens"),
            ("Hagia Sophia", " Istanbul"),
            ("Red Square", " Moscow"),
            ("White House", " Washington"),
            ("Christ the Redeemer statue", " Rio de Janeiro"),
            ("Trevi Fountain", " Rome"),
            ("Notre-Dame Cathedral", " Paris"),
        ]
    ],
    # company founders
    *[
        ("founder", FOUNDER, s, a)
        for s, a in [
            ("Microsoft", " Bill Gates"),
            ("Apple", " Steve Jobs"),
            ("Amazon", " Jeff Bezos"),
            ("Facebook", " Mark Zuckerberg"),
            ("SpaceX", " Elon Musk"),
            ("Alibaba", " Jack Ma"),
            ("Oracle", " Larry Ellison"),
            ("the Ford Motor Company", " Henry Ford"),
            ("Berkshire Hathaway", " Warren Buffett"),
            ("Virgin Group", " Richard Branson"),
        ]
    ],
    # company headquarters (financial firms included)
    *[
        ("headquarters", HQ, s, a)
        for s, a in [
            ("BMW", " Munich"),
            ("Samsung", " Seoul"),
            ("Sony", " Tokyo"),
            ("Microsoft", " Redmond"),
            ("Apple", " Cupertino"),
            ("Siemens", " Munich"),
            ("Airbus", " Toulouse"),
            ("Fiat", " Turin"),
            ("Heineken", " Amsterdam"),
            ("Coca-Cola", " Atlanta"),
            ("Starbucks", " Seattle"),
            ("Amazon", " Seattle"),
            ("Nintendo", " Kyoto"),
            ("Deutsche Bank", " Frankfurt"),
            ("Goldman Sachs", " New York"),
            ("HSBC", " London"),
            ("Barclays", " London"),
            ("UBS", " Zurich"),
            ("BNP Paribas", " Paris"),
            ("Volvo", " Gothenburg"),
            ("Nestle", " Vevey"),
            ("Boeing", " Chicago"),
        ]
    ],
    # products -> maker
    *[
        ("maker", MAKER, s, a)
        for s, a in [
            ("The iPhone", " Apple"),
            ("The PlayStation", " Sony"),
            ("The Xbox", " Microsoft"),
            ("The Mustang car", " Ford"),
            ("The Corolla car", " Toyota"),
            ("The Android operating system", " Google"),
            ("Photoshop", " Adobe"),
            ("The Galaxy smartphone", " Samsung"),
            ("The Model S car", " Tesla"),
            ("The Walkman", " Sony"),
            ("The Big Mac", " McDonald's"),
            ("The Windows operating system", " Microsoft"),
            ("The Kindle", " Amazon"),
            ("The ThinkPad laptop", " Lenovo"),
        ]
    ],
    # official languages
    *[
        ("language", LANGUAGE, s, a)
        for s, a in [
            ("France", " French"),
            ("Germany", " German"),
            ("Spain", " Spanish"),
            ("Italy", " Italian"),
            ("Japan", " Japanese"),
            ("Russia", " Russian"),
            ("Brazil", " Portuguese"),
            ("Mexico", " Spanish"),
            ("Greece", " Greek"),
            ("the Netherlands", " Dutch"),
            ("Sweden", " Swedish"),
            ("Poland", " Polish"),
            ("Turkey", " Turkish"),
            ("Egypt", " Arabic"),
            ("Israel", " Hebrew"),
            ("South Korea", " Korean"),
            ("Vietnam", " Vietnamese"),
            ("Finland", " Finnish"),
            ("Hungary", " Hungarian"),
            ("Iran", " Persian"),
        ]
    ],
    # currencies
    *[
        ("currency", CURRENCY, s, a)
        for s, a in [
            ("Japan", " yen"),
            ("the United Kingdom", " pound"),
            ("the United States", " dollar"),
            ("India", " rupee"),
            ("Russia", " ruble"),
            ("China", " yuan"),
            ("Switzerland", " franc"),
            ("Germany", " euro"),
            ("Mexico", " peso"),
            ("South Korea", " won"),
            ("Turkey", " lira"),
            ("South Africa", " rand"),
            ("Thailand", " baht"),
            ("Israel", " shekel"),
            ("Brazil", " real"),
        ]
    ],
    # athletes
    *[
        ("sport", SPORT, s, a)
        for s, a in [
            ("LeBron James", " basketball"),
            ("Michael Jordan", " basketball"),
            ("Roger Federer", " tennis"),
            ("Serena Williams", " tennis"),
            ("Lionel Messi", " football"),
            ("Cristiano Ronaldo", " football"),
            ("Tiger Woods", " golf"),
            ("Wayne Gretzky", " hockey"),
            ("Babe Ruth", " baseball"),
            ("Rafael Nadal", " tennis"),
            ("Kobe Bryant", " basketball"),
            ("Novak Djokovic", " tennis"),
            ("Shaquille O'Neal", " basketball"),
            ("Derek Jeter", " baseball"),
            ("Sidney Crosby", " hockey"),
        ]
    ],
    # musicians and instruments
    *[
        ("instrument", INSTRUMENT, s, a)
        for s, a in [
            ("Jimi Hendrix", " guitar"),
            ("Yo-Yo Ma", " cello"),
            ("Louis Armstrong", " trumpet"),
            ("Ringo Starr", " drums"),
            ("Frederic Chopin", " piano"),
            ("Miles Davis", " trumpet"),
        ]
    ],
    # authors
    *[
        ("author", AUTHOR, s, a)
        for s, a in [
            ("Romeo and Juliet", " William Shakespeare"),
            ("Hamlet", " William Shakespeare"),
            ("Pride and Prejudice", " Jane Austen"),
            ("The Origin of Species", " Charles Darwin"),
            ("War and Peace", " Leo Tolstoy"),
            ("Oliver Twist", " Charles Dickens"),
        ]
    ],
]

FIELDS = [
    "fact_id",
    "category",
    "relation",
    "subject",
    "prompt",
    "answer",
    "answer_text",
    "smollm2_top1",
    "smollm2_p_answer",
    "kept_smollm2_135m",
]


def fact_rows() -> list[dict[str, str]]:
    """The candidates as rows with ids and prompts, checked for obvious authoring mistakes."""
    rows, seen = [], set()
    for category, template, subject, answer_text in CANDIDATES:
        prompt = template.format(s=subject)
        prompt = prompt[0].upper() + prompt[1:]
        if subject[0].islower() and prompt.startswith(subject[0].upper() + subject[1:]):
            subject = subject[0].upper() + subject[1:]  # "the United Kingdom" opening a sentence
        slug = "".join(ch if ch.isalnum() else "-" for ch in subject.lower()).strip("-")
        fact_id = f"{category}-{slug}"
        if fact_id in seen:
            raise ValueError(f"duplicate candidate {fact_id}")
        seen.add(fact_id)
        if subject not in prompt:
            raise ValueError(f"{fact_id}: subject {subject!r} not in prompt {prompt!r}")
        if not answer_text.startswith(" ") or re.search(rf"\b{re.escape(answer_text.strip())}\b", prompt, re.I):
            raise ValueError(f"{fact_id}: answer {answer_text!r} must start with a space and not appear in the prompt")
        relation = template.replace("{s}", "<subject>")
        rows.append(
            {
                "fact_id": fact_id,
                "category": category,
                "relation": relation,
                "subject": subject,
                "prompt": prompt,
                "answer_text": answer_text,
            }
        )
    return rows


@torch.no_grad()
def render() -> str:
    """Every candidate with the embedded model's reading, as CSV text; prints what was tried and kept."""
    sys.path.insert(0, str(REPO_ROOT))
    from mechfin_utils.core.models import load_model

    rows = fact_rows()  # authoring mistakes fail before the model loads
    model = load_model("smollm2-135m", verbose=False)
    tried, kept = Counter(), Counter()
    for row in rows:
        first = model.tokenizer(row["answer_text"], add_special_tokens=False)["input_ids"][0]
        row["answer"] = model.tokenizer.decode([first])
        answer_id = model.single_token_id(row["answer"])  # raises if decoding did not round-trip
        logits = model.bridge(model.to_tokens(row["prompt"]))[0, -1].float()
        top = int(logits.argmax())
        row["smollm2_top1"] = model.tokenizer.decode([top])
        row["smollm2_p_answer"] = f"{float(logits.softmax(-1)[answer_id]):.4f}"
        row["kept_smollm2_135m"] = str(top == answer_id)
        tried[row["category"]] += 1
        kept[row["category"]] += top == answer_id
    print(f"{model.name}: tried {sum(tried.values())} candidate facts, kept {sum(kept.values())}")
    for category in tried:
        print(f"  {category:13s} kept {kept[category]:3d} of {tried[category]:3d}")
    return csv_build.render_csv(rows, FIELDS)


def main(argv: Sequence[str] | None = None) -> int:
    return csv_build.main(__doc__.splitlines()[0], render, OUT, "data/build_factual_prompts.py", argv)


if __name__ == "__main__":
    raise SystemExit(main())
