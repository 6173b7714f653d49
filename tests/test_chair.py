"""CHAIR on hand-built COCO annotation files; every expected number is worked out by hand."""

import json

import pytest

from vacap.evaluate.chair import Chair, image_id_of

CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 17, "name": "cat"},
    {"id": 18, "name": "dog"},
    {"id": 22, "name": "elephant"},
    {"id": 25, "name": "giraffe"},
    {"id": 58, "name": "hot dog"},
    {"id": 67, "name": "dining table"},
]
NAME_TO_ID = {c["name"]: c["id"] for c in CATEGORIES}
# image id -> annotated classes, one annotation each (a class may be annotated twice)
ANNOTATED = {
    1: ["person", "dog", "dog"],
    2: ["giraffe", "giraffe"],
    3: ["hot dog", "dining table"],
    4: ["elephant"],
    5: [],  # listed, nothing annotated
}


def file_name(image_id):
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def instances(tmp_path):
    annotations = [
        {"id": n, "image_id": image_id, "category_id": NAME_TO_ID[name]}
        for n, (image_id, name) in enumerate(
            ((i, name) for i, names in ANNOTATED.items() for name in names), start=1
        )
    ]
    images = [{"id": i, "file_name": file_name(i)} for i in ANNOTATED]
    return write_json(
        tmp_path / "instances_val2014.json",
        {"images": images, "annotations": annotations, "categories": CATEGORIES},
    )


@pytest.fixture
def chair(instances):
    return Chair.from_coco(instances)


def record(image_id, caption, method="greedy", params=None, status="ok", **extra):
    return {
        "path": f"/data/val2014/{file_name(image_id)}",
        "status": status,
        "caption": caption,
        "method": method,
        "params": params or {},
        **extra,
    }


def test_ground_truth_is_the_annotated_classes(chair):
    assert chair.ground_truth == {
        1: {"person", "dog"},
        2: {"giraffe"},
        3: {"hot dog", "dining table"},
        4: {"elephant"},
        5: set(),
    }


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A man walks his puppy.", [("man", "person"), ("puppy", "dog")]),
        (
            "A woman on a sofa with her kitten",
            [("woman", "person"), ("sofa", "couch"), ("kitten", "cat")],
        ),
        ("A TV above the desk", [("TV", "tv"), ("desk", "dining table")]),
    ],
)
def test_synonyms_map_to_their_class(chair, caption, expected):
    assert chair.objects_in(caption) == expected


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("Two giraffes and some people.", [("giraffes", "giraffe"), ("people", "person")]),
        ("Children feeding mice", [("Children", "person"), ("mice", "mouse")]),
        ("knives, buses, benches", [("knives", "knife"), ("buses", "bus"), ("benches", "bench")]),
        # words that look plural but are the class name itself
        ("A pair of skis and scissors", [("skis", "skis"), ("scissors", "scissors")]),
        ("The dog's bowl", [("dog's", "dog"), ("bowl", "bowl")]),
    ],
)
def test_plurals_and_possessives(chair, caption, expected):
    assert chair.objects_in(caption) == expected


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A hot dog next to a dog.", [("hot dog", "hot dog"), ("dog", "dog")]),
        ("Hot dogs", [("Hot dogs", "hot dog")]),
        ("traffic lights", [("traffic lights", "traffic light")]),
        ("Teddy bears", [("Teddy bears", "teddy bear")]),
        ("fire hydrants", [("fire hydrants", "fire hydrant")]),
        ("cell phones", [("cell phones", "cell phone")]),
        ("wine glasses", [("wine glasses", "wine glass")]),
        ("A stove top oven", [("stove top oven", "oven")]),
        ("a dining table", [("dining table", "dining table")]),
        # punctuation between the words breaks the phrase
        ("It is hot, dog days.", [("dog", "dog")]),
    ],
)
def test_multi_word_objects(chair, caption, expected):
    assert chair.objects_in(caption) == expected


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A baby elephant", [("baby elephant", "elephant")]),
        ("Two adult giraffes and a baby", [("adult giraffes", "giraffe"), ("baby", "person")]),
        ("A baby animal", []),
        ("A passenger train on the train tracks", [("passenger train", "train")]),
        ("A passenger on a bench", [("passenger", "person"), ("bench", "bench")]),
        ("A man in a bow tie", [("man", "person"), ("bow tie", "tie")]),
        ("A toilet seat", [("toilet seat", "toilet")]),
        ("The seat of the toilet is up", [("toilet", "toilet")]),
        ("An empty seat", [("seat", "chair")]),
        ("A man-made lake", []),
    ],
)
def test_special_cases(chair, caption, expected):
    assert chair.objects_in(caption) == expected


def test_caption_without_objects(chair):
    result = chair.score(1, "A sunny day at the beach.")
    assert (result.mentioned, result.hallucinated, result.words) == ([], [], 6)
    assert chair.evaluate([record(1, "A sunny day at the beach.")])["overall"] == {
        "CHAIR_s": 0.0, "CHAIR_i": 0.0, "recall": 0.0, "avg_len": 6.0, "n": 1,
    }


def test_repeated_mentions_each_count(chair):
    # Image 1 holds a person and a dog: mentions dog, cat, dog, cat; both cats hallucinated.
    caption = "A dog and a cat. The dog chases the cat."
    result = chair.score(1, caption)
    assert result.mentioned == ["dog", "cat", "dog", "cat"]
    assert result.hallucinated == [("cat", "cat"), ("cat", "cat")]
    overall = chair.evaluate([record(1, caption)])["overall"]
    assert overall["CHAIR_i"] == 2 / 4
    assert overall["CHAIR_s"] == 1.0
    # the dog is covered once however often it is named: 1 of the 2 ground-truth objects
    assert overall["recall"] == 1 / 2


def test_metrics_on_a_small_set(chair):
    records = [
        record(1, "A man walking a dog on a leash."),  # person, dog; 8 words; covers 2 of 2
        record(2, "Two giraffes standing near a car and a car."),  # giraffe, car x2 wrong; 9 words
        record(3, "A hot dog on a plate."),  # hot dog; 6 words; covers 1 of 2
        record(4, "A baby elephant with a person."),  # elephant, person wrong; 6 words
    ]
    overall = chair.evaluate(records)["overall"]
    assert overall["n"] == 4
    assert overall["CHAIR_s"] == 2 / 4
    assert overall["CHAIR_i"] == 3 / 8  # mentions 2 + 3 + 1 + 2, hallucinated 0 + 2 + 0 + 1
    # summed over captions: (2 + 1 + 1 + 1) / (2 + 1 + 2 + 1), not the mean of 1, 1, 1/2, 1
    assert overall["recall"] == pytest.approx(5 / 6)
    assert overall["avg_len"] == (8 + 9 + 6 + 6) / 4


def test_ground_truth_adds_objects_named_in_human_captions(tmp_path, instances):
    captions = write_json(
        tmp_path / "captions_val2014.json",
        {
            "images": [{"id": 3, "file_name": file_name(3)}],
            "annotations": [
                {"id": 1, "image_id": 3, "caption": "A man eating hot dogs at a table."},
                {"id": 2, "image_id": 6, "caption": "A cat on a bed."},  # only in the captions
            ],
        },
    )
    chair = Chair.from_coco(instances, captions)
    assert chair.ground_truth[3] == {"hot dog", "dining table", "person"}
    assert chair.ground_truth[6] == {"cat", "bed"}
    caption = "A person holding a hot dog."
    assert chair.score(3, caption).hallucinated == []
    assert Chair.from_coco(instances).score(3, caption).hallucinated == [("person", "person")]


def test_from_coco_accepts_loaded_json(instances):
    loaded = json.loads(instances.read_text())
    assert Chair.from_coco(loaded).ground_truth == Chair.from_coco(str(instances)).ground_truth


@pytest.mark.parametrize(
    "rec, expected",
    [
        ({"path": "/data/val2014/COCO_val2014_000000123456.jpg"}, 123456),
        ({"path": "COCO_train2014_000000000042.png"}, 42),
        ({"path": "C:\\coco\\COCO_test2015_000000000007.jpg"}, 7),
        ({"path": "/coco/val2017/000000000139.jpg"}, 139),  # a COCO 2017 name
        ({"path": file_name(1), "image_id": 4}, 4),  # the field wins over the name
        ({"path": "holiday.jpg", "image_id": "4"}, 4),
        ({"path": "holiday.jpg"}, None),
        ({"path": "COCO_val2014_cat.jpg"}, None),
        ({"path": "/photos/2024_05_01.jpg"}, None),
        ({}, None),
    ],
)
def test_image_id_of(rec, expected):
    assert image_id_of(rec) == expected


def test_image_id_field_is_used(chair):
    rec = {"path": "photos/holiday.jpg", "status": "ok", "caption": "A giraffe.", "image_id": 2,
           "method": "greedy", "params": {}}
    result = chair.evaluate([rec])
    assert result["unmatched"] == 0
    assert (result["overall"]["n"], result["overall"]["CHAIR_s"]) == (1, 0.0)


def test_by_method_separates_differing_params(chair):
    common = {"max_new_tokens": 64}
    records = [
        record(1, "A man with a dog and a cat.", "vasparse", {**common, "sparsity": 0.3}),
        record(2, "Two giraffes.", "vasparse", {**common, "sparsity": 0.3}),
        record(1, "A man with a dog.", "vasparse", {**common, "sparsity": 0.7}),
        record(2, "A giraffe and a car.", "greedy", common),
    ]
    result = chair.evaluate(records)
    by_method = result["by_method"]
    assert list(by_method) == ["vasparse sparsity=0.3", "vasparse sparsity=0.7", "greedy"]
    # person, dog, cat (cat wrong) + giraffe
    assert by_method["vasparse sparsity=0.3"]["CHAIR_s"] == 1 / 2
    assert by_method["vasparse sparsity=0.3"]["CHAIR_i"] == 1 / 4
    assert by_method["vasparse sparsity=0.3"]["n"] == 2
    assert by_method["vasparse sparsity=0.7"]["CHAIR_i"] == 0.0
    assert by_method["greedy"]["CHAIR_i"] == 1 / 2  # giraffe, car (wrong)
    assert result["overall"]["CHAIR_i"] == 2 / 8
    assert result["overall"]["n"] == 4


def test_by_method_names_the_model_when_models_differ(chair):
    records = [record(2, "A giraffe.", model="llava-a"), record(2, "A car.", model="llava-b")]
    by_method = chair.evaluate(records)["by_method"]
    assert by_method["greedy model=llava-a"]["CHAIR_s"] == 0.0
    assert by_method["greedy model=llava-b"]["CHAIR_s"] == 1.0


def test_unmatched_and_failed_records(chair):
    records = [
        record(1, "A dog."),
        record(999999, "A dog."),  # not in the annotations
        {"path": "dog.jpg", "status": "ok", "caption": "A dog.", "method": "greedy", "params": {}},
        record(2, None, status="error", error="out of memory"),
        record(3, "A hot dog.", status="error", error="timeout"),
        record(3, "A hot dog."),  # the retry of the failed image wins
    ]
    result = chair.evaluate(records)
    assert result["unmatched"] == 2
    assert result["not_ok"] == 1
    assert result["overall"]["n"] == 2
    assert "per_image" not in result


def test_per_image_entries(chair):
    result = chair.evaluate([record(2, "A giraffe and a car.")], per_image=True)
    assert result["per_image"] == [
        {
            "path": f"/data/val2014/{file_name(2)}",
            "image_id": 2,
            "method": "greedy",
            "caption": "A giraffe and a car.",
            "hallucinated": [["car", "car"]],
            "mentioned": ["giraffe", "car"],
        }
    ]


def test_image_without_annotations_hallucinates_every_object(chair):
    assert chair.score(5, "A dog.").hallucinated == [("dog", "dog")]


def test_score_of_an_unknown_image_fails(chair):
    with pytest.raises(KeyError):
        chair.score(42, "A dog.")
