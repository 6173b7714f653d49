"""COCO object words for CHAIR: the 80 classes, their synonyms and the multi-word rules.

Source: the CHAIR reference implementation of Rohrbach et al. (2018), "Object Hallucination in
Image Captioning", github.com/LisaAnne/Hallucination, ``data/synonyms.txt`` and the hard-coded
rules of ``utils/chair.py``, in the form the hallucination papers (OPERA, VCD, HALC, VASparse)
use. The word lists are copied as data, including the misspellings that list carries on purpose
("televison", "solider", "phon", "knive") because captions misspell too. Changes: every word
is lowercase ("iPhone" could never match a lowercased caption), repeats within a class are
dropped, and stray spaces are gone ("cake,  cheesecake" made the word " cheesecake", which
never matched).
"""

# Class name (as in COCO's instances "categories") -> the other words that mean it.
# In COCO category order.
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult",
        "rider", "children", "baby", "worker", "passenger", "sister", "biker", "policeman",
        "cop", "officer", "lady", "cowboy", "bride", "groom", "male", "female", "guy",
        "traveler", "mother", "father", "gentleman", "pitcher", "player", "skier",
        "snowboarder", "skater", "skateboarder", "foreigner", "caller", "offender", "coworker",
        "trespasser", "patient", "politician", "soldier", "grandchild", "serviceman", "walker",
        "drinker", "doctor", "bicyclist", "thief", "buyer", "teenager", "student", "camper",
        "driver", "solider", "hunter", "shopper", "villager",
    ),
    "bicycle": ("bike", "unicycle", "minibike", "trike"),
    "car": (
        "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe",
        "taxicab", "limo", "taxi",
    ),
    "motorcycle": ("scooter", "motor bike", "motor cycle", "motorbike", "moped"),
    "airplane": (
        "jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus", "biplane",
        "seaplane",
    ),
    "bus": ("minibus", "trolley"),
    "train": ("locomotive", "tramway", "caboose"),
    "truck": ("pickup", "lorry", "hauler", "firetruck"),
    "boat": (
        "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe",
        "skiff", "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat",
        "trawler", "ferryboat", "watercraft", "tugboat", "schooner", "barge", "ferry",
        "sailboard", "paddleboat", "lifeboat", "freighter", "steamboat", "riverboat",
        "battleship", "steamship",
    ),
    "traffic light": (
        "street light", "traffic signal", "stop light", "streetlight", "stoplight",
    ),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("pew",),
    "bird": (
        "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican",
        "waterfowl", "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird",
        "osprey", "blackbird", "fowl", "shorebird", "woodpecker", "egret", "chickadee", "quail",
        "bluebird", "kingfisher", "buzzard", "willet", "gull", "swan", "bluejay", "flamingo",
        "cormorant", "parrot", "loon", "gosling", "waterbird", "pheasant", "rooster",
        "sandpiper", "crow", "raven", "turkey", "oriole", "cowbird", "warbler", "magpie",
        "peacock", "cockatiel", "lorikeet", "puffin", "vulture", "condor", "macaw", "peafowl",
        "cockatoo", "songbird",
    ),
    "cat": ("kitten", "feline", "tabby"),
    "dog": (
        "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine",
        "pitbull", "collie", "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt",
        "doggy", "spaniel", "bulldog", "sheepdog", "weimaraner", "corgi", "cocker", "greyhound",
        "retriever", "brindle", "hound", "whippet", "husky",
    ),
    "horse": (
        "colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino",
        "mustang", "clydesdale", "bronc", "bronco",
    ),
    "sheep": ("lamb", "ram", "goat", "ewe"),
    "cow": (
        "cattle", "oxen", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison",
    ),
    "elephant": (),
    "bear": ("panda",),
    "zebra": (),
    "giraffe": (),
    "backpack": ("knapsack",),
    "umbrella": (),
    "handbag": ("wallet", "purse", "briefcase"),
    "tie": ("bow", "bow tie"),
    "suitcase": ("suit case", "luggage"),
    "frisbee": (),
    "skis": ("ski",),
    "snowboard": (),
    "sports ball": ("ball",),
    "kite": (),
    "baseball bat": (),
    "baseball glove": (),
    "skateboard": (),
    "surfboard": ("longboard", "skimboard", "shortboard", "wakeboard"),
    "tennis racket": ("racket",),
    "bottle": (),
    "wine glass": (),
    "cup": (),
    "fork": (),
    "knife": ("pocketknife", "knive"),
    "spoon": (),
    "bowl": ("container",),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "sub", "cheeseburger", "hamburger"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": (),
    "pizza": (),
    "donut": ("doughnut", "bagel"),
    "cake": ("cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("seat", "stool"),
    "couch": ("sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("houseplant",),
    "bed": (),
    "dining table": ("table", "desk"),
    "toilet": ("urinal", "commode", "lavatory", "potty"),
    "tv": ("monitor", "televison", "television"),
    "laptop": (
        "computer", "notebook", "netbook", "lenovo", "macbook", "laptop computer",
    ),
    "mouse": (),
    "remote": (),
    "keyboard": (),
    "cell phone": (
        "mobile phone", "phone", "cellphone", "telephone", "phon", "smartphone", "iphone",
    ),
    "microwave": (),
    "oven": ("stovetop", "stove", "stove top oven"),
    "toaster": (),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": (),
    "teddy bear": ("teddybear",),
    "hair drier": ("hairdryer",),
    "toothbrush": (),
}

# Multi-word names that are read as one word, so that "hot dog" is not a dog and "teddy bear"
# not a bear (the reference's ``coco_double_words``). "home plate" and "train track" name no
# COCO object: reading them as one word keeps "train" in "train track" from counting as a train.
MULTI_WORDS: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)

# "baby elephant" / "adult elephant" is the animal: without this rule "baby" and "adult" would
# count as a person. "animal" and "cub" name no COCO class, so "baby animal" counts as nothing.
QUALIFIED_ANIMALS: tuple[str, ...] = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "animal", "cub",
)
ANIMAL_QUALIFIERS: tuple[str, ...] = ("baby", "adult")

# "passenger jet" / "passenger train" is the vehicle, not a person.
PASSENGER_VEHICLES: tuple[str, ...] = ("jet", "train")

# Phrases read as one other word: a bow tie is a tie; a toilet seat is the toilet, not a chair.
PHRASE_MEANINGS: dict[str, str] = {
    "bow tie": "tie",
    "toilet seat": "toilet",
}
