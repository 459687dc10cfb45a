"""The demo's text collection: a shop's product catalogue, generated, always the same.

Eight categories, each with its products (a name and what it is for, in the words a
product page uses), every product in several variants (a brand line, a colour, a
size), each variant with a description of two or three sentences and a price. The words
of a query rarely appear in the descriptions that answer it ("something to keep my
coffee hot" finds the insulated mugs): that is what semantic search is for."""

from __future__ import annotations

import random
from typing import Any

__all__ = ["CATEGORIES", "QUERIES", "products"]

# category -> [(name, what it is, the sentence that says what it does)]
_CATALOGUE: dict[str, list[tuple[str, str, str]]] = {
    "kitchen": [
        ("French press", "a glass and steel coffee maker", "Brews four cups of rich coffee."),
        ("travel mug", "a vacuum insulated tumbler", "Drinks stay hot for twelve hours."),
        ("chef's knife", "a forged steel kitchen knife", "Slices tomatoes and herbs cleanly."),
        ("cast iron skillet", "a pre-seasoned frying pan", "Sears steak and bakes cornbread."),
        ("electric kettle", "a fast boiling water heater", "Holds tea water at 80 degrees."),
        ("spice rack", "a wall mounted spice organiser", "Keeps twenty jars within reach."),
    ],
    "audio": [
        (
            "noise cancelling headphones",
            "over-ear wireless headphones",
            "Silences engine drone on long flights.",
        ),
        (
            "bluetooth speaker",
            "a portable waterproof speaker",
            "Plays loud music at the beach for a day.",
        ),
        ("earbuds", "true wireless in-ear buds", "Fit snugly during workouts."),
        ("turntable", "a belt drive record player", "Spins vinyl records with warm sound."),
        ("podcast microphone", "a USB condenser microphone", "Records clear voice at home."),
    ],
    "outdoor": [
        ("rain jacket", "a waterproof breathable shell", "Keeps hikers dry in a downpour."),
        ("camping tent", "a two person dome tent", "Pitches in five minutes on any ground."),
        ("hiking boots", "leather boots with ankle support", "Grip rocky trails and wet mud."),
        (
            "sleeping bag",
            "a down sleeping bag rated to minus five",
            "Keeps you warm on cold nights outside.",
        ),
        ("headlamp", "a rechargeable LED head torch", "Lights the path after dark."),
    ],
    "office": [
        (
            "standing desk",
            "an electric height adjustable desk",
            "Lets you work sitting or standing.",
        ),
        (
            "ergonomic chair",
            "a mesh chair with lumbar support",
            "Eases back pain during long workdays.",
        ),
        (
            "mechanical keyboard",
            "a keyboard with tactile switches",
            "Types with a satisfying click.",
        ),
        ("monitor arm", "a gas spring screen mount", "Frees desk space and raises the screen."),
        ("notebook", "a dotted hardcover journal", "Holds plans, sketches and lists."),
    ],
    "pets": [
        ("cat scratching post", "a sisal rope tower", "Saves the sofa from sharp claws."),
        ("dog leash", "a reflective nylon lead", "Keeps walks safe at night."),
        ("automatic feeder", "a timed food dispenser", "Feeds pets while owners are away."),
        ("pet bed", "an orthopedic foam cushion", "Gives old dogs a soft place to sleep."),
        (
            "aquarium filter",
            "a quiet three stage fish tank filter",
            "Keeps the water clear for fish.",
        ),
    ],
    "fitness": [
        ("yoga mat", "a non-slip exercise mat", "Cushions knees during stretches."),
        ("dumbbells", "an adjustable weight set", "Builds strength at home."),
        ("jump rope", "a speed skipping rope", "Burns calories in short sessions."),
        ("running shoes", "lightweight cushioned trainers", "Absorb impact on long runs."),
        ("foam roller", "a textured massage roller", "Loosens sore muscles after training."),
    ],
    "garden": [
        ("watering can", "a long spout galvanised can", "Waters seedlings gently."),
        ("pruning shears", "bypass secateurs", "Cut roses and small branches."),
        ("raised bed", "a cedar planter box", "Grows vegetables without digging."),
        ("hose reel", "a wall mounted hose holder", "Keeps thirty metres of hose tidy."),
        ("bird feeder", "a squirrel proof seed feeder", "Brings finches to the window."),
    ],
    "toys": [
        ("building blocks", "a set of interlocking bricks", "Lets children build castles."),
        ("jigsaw puzzle", "a thousand piece puzzle", "Keeps families busy on rainy days."),
        ("remote control car", "a fast off-road racer", "Drives over gravel and grass."),
        ("plush bear", "a soft cuddly teddy", "Comforts toddlers at bedtime."),
        ("chess set", "a wooden board with weighted pieces", "Teaches strategy to young players."),
    ],
}

CATEGORIES: tuple[str, ...] = tuple(_CATALOGUE)

_LINES = ("Classic", "Pro", "Eco", "Compact", "Deluxe", "Everyday")
_COLOURS = ("black", "white", "sage green", "navy", "red", "sand")
_EXTRAS = (
    "Backed by a two year warranty.",
    "Made from recycled materials.",
    "Ships in plastic-free packaging.",
    "Rated five stars by our customers.",
    "A favourite gift this season.",
    "Easy to clean and built to last.",
)

#: Questions a shopper might type, with the category whose products answer them.
QUERIES: tuple[tuple[str, str], ...] = (
    ("something to keep my coffee hot on the commute", "kitchen"),
    ("block out the noise on a plane", "audio"),
    ("stay dry while walking in the rain", "outdoor"),
    ("my back hurts after sitting all day at work", "office"),
    ("stop my cat from ruining the couch", "pets"),
)


def products(variants: int = 6, seed: int = 7) -> list[dict[str, Any]]:
    """The catalogue: every product in `variants` variants (6: 246 documents), as
    `{_id, name, category, price, description}`, the same for the same arguments."""
    rng = random.Random(seed)
    documents: list[dict[str, Any]] = []
    for category, items in _CATALOGUE.items():
        for name, what, does in items:
            for k in range(variants):
                line, colour = _LINES[k % len(_LINES)], rng.choice(_COLOURS)
                extra = rng.choice(_EXTRAS)
                documents.append(
                    {
                        "_id": len(documents) + 1,
                        "name": f"{line} {name} ({colour})",
                        "category": category,
                        "price": round(rng.uniform(8, 240), 2),
                        "description": f"The {line} {name} is {what}. {does} {extra}",
                    }
                )
    return documents
