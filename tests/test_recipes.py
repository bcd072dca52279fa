"""Recipes: every official ODinW config, COCO and LVIS; exact evaluation captions; one-line errors; the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glip_transfer.prompts import MAX_QUERY_LEN, token_count
from glip_transfer.recipes import (
    FROM_ANNOTATIONS,
    RecipeError,
    evaluation_captions,
    evaluation_prompt,
    list_recipes,
    load_recipe,
    read_recipe_file,
    recipe_prompts,
    recipes_dir,
    resolve_categories,
    untokenized_captions,
)

REPO = Path(__file__).resolve().parents[1]

# the official evaluation captions (create_queries_and_maps with USE_OVERRIDE_CATEGORY and
# USE_CAPTION_PROMPT True, SEPARATION_TOKENS ". "), as derived from the official configs
OFFICIAL_CAPTIONS = {
    "odinw35/AerialMaritimeDrone_large": "boat. car. dock. jetski. lift",
    "odinw13/AerialMaritimeDrone_large": "boat. car. dock. jetski. lift",
    "odinw35/Aquarium_Aquarium_Combined.v2-raw-1024.coco": (
        " fish. jellyfish. penguin , which is black and white. puffin with orange beaks . shark. starfish. "
        "stingray which is flat and round"
    ),
    "odinw13/Aquarium_Aquarium_Combined.v2-raw-1024.coco": (
        "fish. jellyfish. penguin. puffin. shark. starfish. stingray"
    ),
    "odinw35/EgoHands_generic": " hand of a person",
    "odinw13/EgoHands_generic": "hand",
    "odinw35/Packages_Raw": "there is a package on the porch",
    "odinw35/pothole": "there are some holes on the road",
    "odinw13/pothole": "pothole",
    "odinw35/CottontailRabbits": "rabbit",
    "odinw13/CottontailRabbits": "Cottontail-Rabbit",
    "odinw35/NorthAmericaMushrooms_North_American_Mushrooms.v1-416x416.coco": "flat mushroom. yellow mushroom",
    "odinw13/NorthAmericaMushrooms_North_American_Mushrooms.v1-416x416.coco": "CoW. chanterelle",
    "odinw35/ChessPieces_Chess_Pieces.v23-raw.coco": (
        " . black bishop. black king. black knight. black pawn. black queen. black rook. white bishop. "
        "white king. white knight. white pawn. white queen. white rook"
    ),
    "odinw35/DroneControl_Drone_Control.v3-raw.coco": (
        "follow. follow hand. land. land hand. null. object. takeoff. takeoff-hand"
    ),
    "odinw35/brackishUnderwater_960x540": "crab. fish. jellyfish. shrimp. small fish. starfish",
    "odinw35/boggleBoards_416x416AutoOrient_export_": (
        "Q. a. an. b. c. d. e. er. f. g. h. he. i. in. j. k. l. m. n. o. o . p. q. qu. r. s. t. t\\. th. u. v. w. "
        "wild. x. y. z"
    ),
    "odinw35/UnoCards_raw": "0. 1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12. 13. 14",
    "odinw35/selfdrivingCar_fixedLarge_export_": (
        "biker. car. pedestrian. trafficLight. trafficLight-Green. trafficLight-GreenLeft. trafficLight-Red. "
        "trafficLight-RedLeft. trafficLight-Yellow. trafficLight-YellowLeft. truck"
    ),
    "odinw35/PascalVOC": (
        "aeroplane. bicycle. bird. boat. bottle. bus. car. cat. chair. cow. diningtable. dog. horse. motorbike. "
        "person. pottedplant. sheep. sofa. train. tvmonitor"
    ),
}

ODINW35 = [
    "AerialMaritimeDrone_large",
    "AerialMaritimeDrone_tiled",
    "AmericanSignLanguageLetters_American_Sign_Language_Letters.v1-v1.coco",
    "Aquarium_Aquarium_Combined.v2-raw-1024.coco",
    "BCCD_BCCD.v3-raw.coco",
    "ChessPieces_Chess_Pieces.v23-raw.coco",
    "CottontailRabbits",
    "DroneControl_Drone_Control.v3-raw.coco",
    "EgoHands_generic",
    "EgoHands_specific",
    "HardHatWorkers_raw",
    "MaskWearing_raw",
    "MountainDewCommercial",
    "NorthAmericaMushrooms_North_American_Mushrooms.v1-416x416.coco",
    "OxfordPets_by-breed",
    "OxfordPets_by-species",
    "PKLot_640",
    "Packages_Raw",
    "PascalVOC",
    "Raccoon_Raccoon.v2-raw.coco",
    "ShellfishOpenImages_raw",
    "ThermalCheetah",
    "UnoCards_raw",
    "VehiclesOpenImages_416x416",
    "WildfireSmoke",
    "boggleBoards_416x416AutoOrient_export_",
    "brackishUnderwater_960x540",
    "dice_mediumColor_export",
    "openPoetryVision_512x512",
    "pistols_export",
    "plantdoc_100x100",
    "plantdoc_416x416",
    "pothole",
    "selfdrivingCar_fixedLarge_export_",
    "thermalDogsAndPeople",
    "websiteScreenshots",
]
ODINW13 = [
    "AerialMaritimeDrone_large",
    "Aquarium_Aquarium_Combined.v2-raw-1024.coco",
    "CottontailRabbits",
    "EgoHands_generic",
    "NorthAmericaMushrooms_North_American_Mushrooms.v1-416x416.coco",
    "Packages_Raw",
    "PascalVOC",
    "Raccoon_Raccoon.v2-raw.coco",
    "ShellfishOpenImages_raw",
    "VehiclesOpenImages_416x416",
    "pistols_export",
    "pothole",
    "thermalDogsAndPeople",
]


@pytest.fixture(scope="module")
def all_recipes():
    return {r.name: r for r in list_recipes()}


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def captions_quietly(recipe, tokenizer, annotation_categories=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluation_prompt(recipe, tokenizer, annotation_categories, warn=False)


# --------------------------------------------------------------------------- the set of recipes


def test_every_official_config_has_a_recipe(all_recipes):
    expected = (
        {f"odinw35/{n}" for n in ODINW35} | {f"odinw13/{n}" for n in ODINW13} | {"coco", "lvis-minival", "lvis-val"}
    ) | {"demo/novel", "demo/shifted", "nano/pretrain"}  # glip-nano's synthetic recipes
    assert set(all_recipes) == expected
    assert len(ODINW35) == 36 and len(ODINW13) == 13
    for name, recipe in all_recipes.items():
        path = Path(recipe.path)
        assert path.relative_to(recipes_dir()).with_suffix("").as_posix() == name  # name = file location
        assert recipe.evaluation.split in recipe.splits


def test_odinw_recipes_are_complete(all_recipes, tokenizer):
    aliases = set()
    for name, recipe in all_recipes.items():
        if not name.startswith("odinw"):
            continue
        assert {"train", "val", "test"} <= set(recipe.splits), name
        assert recipe.source == f"configs/odinw_{name[5:7]}/{name.split('/', 1)[1]}.yaml"
        assert recipe.evaluation.split in ("val", "minival")
        assert (recipe.evaluation.min_size, recipe.evaluation.max_size, recipe.evaluation.detections_per_img) == (
            800,
            1333,
            100,
        )
        assert recipe.evaluation.chunk_size is None and recipe.evaluation.metric == "coco"
        assert [c.id for c in recipe.categories] == list(range(1, len(recipe.categories) + 1))
        assert (
            recipe.few_shot is not None
            and recipe.few_shot.shots == (1, 3, 5, 10)
            and recipe.few_shot.seeds == (3, 30, 300)
        )
        assert recipe.split("train").ann_file.startswith("odinw/")
        assert recipe.tuning is not None and recipe.tuning.val_split == recipe.evaluation.split
        assert len(recipe.aliases) == 1 and recipe.aliases[0] not in aliases
        aliases.add(recipe.aliases[0])
        prompt = captions_quietly(recipe, tokenizer)
        assert not prompt.chunked and token_count(tokenizer, prompt.captions[0]) <= MAX_QUERY_LEN
        undetectable = {"odinw35/ChessPieces_Chess_Pieces.v23-raw.coco": ["  "]}.get(name, [])
        assert prompt.undetectable == undetectable, name


@pytest.mark.parametrize("name", sorted(OFFICIAL_CAPTIONS))
def test_official_evaluation_captions(name, tokenizer):
    recipe = load_recipe(name)
    assert captions_quietly(recipe, tokenizer).caption_or_captions == OFFICIAL_CAPTIONS[name]
    assert untokenized_captions(recipe) == OFFICIAL_CAPTIONS[name]


def test_evaluation_captions_warns_for_chesspieces(tokenizer):
    with pytest.warns(UserWarning, match="cannot be detected"):
        caption = evaluation_captions(load_recipe("odinw35/chesspieces"), tokenizer)
    assert caption.startswith(" . black bishop")


def test_odd_category_names_byte_for_byte():
    chess = {c.id: c.name for c in load_recipe("odinw35/chesspieces").categories}
    assert chess[1] == "  " and chess[2] == "black bishop"
    boggle = {c.id: c.name for c in load_recipe("odinw35/boggleboards").categories}
    assert boggle[20] == "o" and boggle[21] == "o "
    assert boggle[28] == "t\\" and len(boggle[28]) == 2  # t and ONE backslash (the config's "t\\\\" literal)
    assert len(boggle) == 36
    pets = load_recipe("odinw35/oxfordpets-by-breed")
    assert len(pets.categories) == 37 and pets.categories[4].name == "cat-British_Shorthair"
    assert load_recipe("odinw35/openpoetryvision").categories[0].name == "American Typewriter"


def test_aquarium_recipe_spans_cover_names(tokenizer):
    prompt = captions_quietly(load_recipe("odinw35/aquarium"), tokenizer)
    chunk = prompt.chunks[0]
    assert chunk.names == ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]
    assert [chunk.text[s:e] for ((s, e),) in chunk.caption.spans_per_label] == chunk.names
    assert chunk.label_to_tokens[1] == [1] and chunk.label_to_category_id == {i: i for i in range(1, 8)}


def test_override_prompt_files_match_recipes():
    for alias, names in (
        ("odinw35/cottontailrabbits", ["rabbit"]),
        ("odinw35/northamericamushrooms", ["flat mushroom", "yellow mushroom"]),
    ):
        recipe = load_recipe(alias)
        prompts = recipe_prompts(recipe)
        assert [p.override for p in prompts.values()] == names == [c.name for c in recipe.categories]


def test_aliases_and_lookup():
    full = load_recipe("odinw35/Aquarium_Aquarium_Combined.v2-raw-1024.coco")
    assert load_recipe("odinw35/aquarium").name == full.name
    assert load_recipe("ODINW35/Aquarium").name == full.name
    assert load_recipe("odinw13/aquarium").name == "odinw13/Aquarium_Aquarium_Combined.v2-raw-1024.coco"
    assert load_recipe(full.path).name == full.name
    assert load_recipe("coco-val2017").name == "coco"
    with pytest.raises(RecipeError) as e:
        load_recipe("odinw35/aquaruim")
    assert "did you mean" in one_line(e) and "odinw35/aquarium" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe("missing/recipe.yaml")
    assert "not found" in one_line(e)


def test_tuning_is_official():
    tuning = load_recipe("odinw35/aquarium").tuning
    full, prompt, probe = tuning.modes["full"], tuning.modes["prompt"], tuning.modes["linear_probe"]
    assert (full.lr, full.language_lr, full.weight_decay, full.freeze_backbone_at) == (1e-4, 1e-5, 0.05, 2)
    assert (prompt.lr, prompt.weight_decay, prompt.trains) == (0.05, 0.25, "prompt")
    assert (probe.lr, probe.weight_decay, probe.trains) == (1e-4, 0.05, "head_predictors")
    assert (tuning.optimizer, tuning.batch_size, tuning.max_epochs, tuning.warmup_iters) == ("adamw", 4, 200, 0)
    assert (tuning.lr_decay_factor, tuning.lr_patience, tuning.early_stop_patience) == (0.1, 3, 8)
    assert tuning.few_shot_copies == {1: 8, 3: 4, 5: 2, 10: 1}
    assert (tuning.all_data.copies, tuning.all_data.lr_patience, tuning.all_data.early_stop_patience) == (1, 2, 4)
    assert (tuning.grad_clip_norm, tuning.bias_lr_factor, tuning.bias_weight_decay, tuning.seed) == (1.0, 2.0, 0.0, 10)


def test_paths_follow_the_official_register():
    recipe = load_recipe("odinw35/aquarium")
    assert (
        recipe.split().ann_file
        == "odinw/Aquarium/Aquarium Combined.v2-raw-1024.coco/valid/annotations_without_background.json"
    )
    assert recipe.split("test").img_dir == "odinw/Aquarium/Aquarium Combined.v2-raw-1024.coco/test"
    assert recipe.few_shot.ann_file("train", 5, 30) == (
        "odinw/Aquarium/Aquarium Combined.v2-raw-1024.coco/train/fewshot_train_shot5_seed30.json"
    )
    boggle = load_recipe("odinw35/boggleboards")
    assert (
        boggle.split("train").ann_file
        == "odinw/boggleBoards/416x416AutoOrient/export/train_annotations_without_background.json"
    )
    assert boggle.split("train").img_dir == "odinw/boggleBoards/416x416AutoOrient/export/"
    ego = load_recipe("odinw35/egohands-generic")
    assert ego.evaluation.split == "minival" and ego.split().img_dir == "odinw/EgoHands/generic/mini_val"
    assert ego.few_shot.ann_file("minival", 1, 3) == "odinw/EgoHands/generic/mini_val/fewshot_minival_shot1_seed3.json"
    with pytest.raises(RecipeError):
        recipe.few_shot.ann_file("minival", 1, 3)
    with pytest.raises(RecipeError, match="no split"):
        recipe.split("minival")


# --------------------------------------------------------------------------- COCO and LVIS


def test_coco_recipe(tokenizer):
    coco = load_recipe("coco")
    ids = [c.id for c in coco.categories]
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90 and 12 not in ids
    assert coco.split().ann_file == "coco/annotations/instances_val2017.json" and coco.split().img_dir == "coco/val2017"
    caption = evaluation_captions(coco, tokenizer)
    assert isinstance(caption, str)  # 80 names fit in one caption
    assert caption.startswith("person. bicycle. car. motorcycle. airplane") and caption.endswith(
        "hair drier. toothbrush"
    )
    assert token_count(tokenizer, caption) <= MAX_QUERY_LEN


def fake_lvis(root: Path, n: int = 100) -> list[dict]:
    categories = [{"id": i, "name": f"thing_{i}_(kind)", "synset": "x"} for i in range(n, 0, -1)]
    path = root / "coco" / "annotations" / "lvis_v1_minival_inserted_image_name.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    return categories


def test_lvis_recipe_chunks_of_40(tokenizer, tmp_path):
    lvis = load_recipe("lvis-minival")
    assert lvis.categories == FROM_ANNOTATIONS and lvis.categories_from_annotations
    assert (lvis.evaluation.chunk_size, lvis.evaluation.detections_per_img, lvis.evaluation.metric) == (
        40,
        300,
        "lvis_fixed_ap",
    )
    assert lvis.split().ann_file == "coco/annotations/lvis_v1_minival_inserted_image_name.json"
    assert lvis.split().img_dir == "coco"
    with pytest.raises(RecipeError) as e:
        evaluation_captions(lvis, tokenizer)
    assert "annotation file" in one_line(e)
    categories = fake_lvis(tmp_path)
    prompt = evaluation_prompt(lvis, tokenizer, categories)
    assert [len(c.category_ids) for c in prompt.chunks] == [40, 40, 20]
    assert prompt.chunks[0].text.startswith("thing 1 . thing 2 . ")
    assert prompt.chunks[2].category_ids == list(range(81, 101))
    assert prompt.undetectable == []
    assert load_recipe("lvis-val").evaluation.split == "val"


def test_resolve_categories_checks_ids():
    recipe = load_recipe("odinw35/aquarium")
    annotation = [{"id": i, "name": n} for i, n in enumerate(["creatures", "fish", "jellyfish"], start=0)]
    with pytest.raises(RecipeError) as e:
        resolve_categories(recipe, annotation)
    assert "not in the annotation file" in one_line(e)
    full = [{"id": c.id, "name": c.name.upper()} for c in recipe.categories]
    assert resolve_categories(recipe, full) == recipe.category_list()  # the recipe's names win (override)


def test_round_trip_and_overrides(all_recipes):
    from glip_transfer.config import apply_overrides
    from glip_transfer.recipes import parse_recipe, recipe_to_dict

    for recipe in all_recipes.values():
        data = {k: v for k, v in recipe_to_dict(recipe).items() if k != "path"}
        assert parse_recipe(data, "round trip", recipe.path) == recipe
        assert parse_recipe(json.loads(json.dumps(data)), "json", recipe.path) == recipe
    aquarium = all_recipes["odinw35/Aquarium_Aquarium_Combined.v2-raw-1024.coco"]
    data = {k: v for k, v in recipe_to_dict(aquarium).items() if k != "path"}
    changed = parse_recipe(apply_overrides(data, ["evaluation.chunk_size=3", "tuning.modes.full.lr=0.0002"]), "--set")
    assert changed.evaluation.chunk_size == 3 and changed.tuning.modes["full"].lr == 0.0002
    with pytest.raises(RecipeError) as e:
        parse_recipe(apply_overrides(data, ["evaluation.split=nope"]), "--set on aquarium")
    assert one_line(e).startswith("--set on aquarium: evaluation.split 'nope'")


# --------------------------------------------------------------------------- bad recipes


GOOD = """
name: "mine"
splits:
  val: {ann_file: "a/val.json", img_dir: "a/val"}
categories:
  - {id: 1, name: "cat"}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_recipe_defaults(tmp_path, tokenizer):
    recipe = read_recipe_file(write(tmp_path, GOOD))
    assert recipe.evaluation.split == "val" and recipe.evaluation.detections_per_img == 100
    assert recipe.tuning is None and recipe.prompts is None
    assert evaluation_captions(recipe, tokenizer) == "cat"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("splits: {val: {ann_file: a, img_dir: b}}\ncategories: [{id: 1, name: x}]\n", "missing 'name'"),
        (GOOD + "colour: red\n", "unknown key 'colour'"),
        (GOOD + "evaluation: {min_size: big}\n", "evaluation.min_size: expected a whole number"),
        (GOOD + "evaluation: {split: test}\n", "evaluation.split 'test' is not in splits"),
        (GOOD + "evaluation: {chunk_size: 0}\n", "chunk_size must be >= 1"),
        (GOOD + "evaluation: {metric: voc}\n", "evaluation.metric 'voc'"),
        (GOOD.replace('{id: 1, name: "cat"}', '{id: 1, name: "cat"}\n  - {id: 1, name: "dog"}'), "id 1 repeats"),
        (GOOD.replace('{id: 1, name: "cat"}', '{id: one, name: "cat"}'), "categories[0].id: expected a whole number"),
        (GOOD.replace('{id: 1, name: "cat"}', '{name: "cat"}'), "needs both 'id' and 'name'"),
        (GOOD + 'prompts: "nowhere.yaml"\n', "prompts: file 'nowhere.yaml' not found"),
        (GOOD.replace('categories:\n  - {id: 1, name: "cat"}', "categories: all"), "categories: 'all' is not a list"),
        (
            GOOD.replace('{ann_file: "a/val.json", img_dir: "a/val"}', "{ann_file: a}"),
            "needs both 'ann_file' and 'img_dir'",
        ),
        (
            GOOD + "tuning: {modes: {full: {lr: 0.1, weight_decay: 0, trains: everything}}, "
            "val_split: val, test_split: val}\n",
            "trains 'everything'",
        ),
        (
            GOOD + "tuning: {batch_size: four, val_split: val, test_split: val}\n",
            "tuning: batch_size: expected a whole number",
        ),
        (GOOD + "tuning: {}\n", "tuning: split 'test' is not in splits"),
        (GOOD + "synthetic: {split: nope, folder: a}\n", "synthetic.split 'nope'"),
        (GOOD + "synthetic: {split: novel, folder: elsewhere}\n", "is not under synthetic.folder 'elsewhere'"),
        (GOOD + "pretraining: {train: {lr: fast}}\n", "pretraining.train.lr: expected a number"),
        (GOOD + "pretraining: {train: {speed: 1}}\n", "unknown key 'speed'"),
        ("name: [unclosed\n", "not valid YAML"),
        ("- a list\n", "top level"),
    ],
)
def test_bad_recipes_give_one_line_errors(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        read_recipe_file(path)
    message = one_line(e)
    assert str(path) in message, message
    assert expected in message, message


def test_prompt_file_relative_to_recipe(tmp_path, tokenizer):
    write(tmp_path, 'categories:\n  - {id: 1, prefix: "a ", name: "kitten", suffix: " indoors"}\n', "p.yaml")
    recipe = read_recipe_file(write(tmp_path, GOOD + 'prompts: "p.yaml"\n'))
    assert evaluation_captions(recipe, tokenizer) == "a kitten indoors"
    write(tmp_path, "categories:\n  - {id: 5, override: dog}\n", "q.yaml")
    recipe = read_recipe_file(write(tmp_path, GOOD + 'prompts: "q.yaml"\n', "r2.yaml"))
    with pytest.raises(RecipeError) as e:
        evaluation_captions(recipe, tokenizer)
    assert "id 5" in one_line(e)


def test_recipes_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "team").mkdir()
    write(tmp_path / "team", GOOD.replace('"mine"', '"team/mine"'), "mine.yaml")
    monkeypatch.setenv("GLIP_RECIPES_DIR", str(tmp_path))
    assert recipes_dir() == tmp_path
    assert load_recipe("team/mine").name == "team/mine"
    assert [r.name for r in list_recipes()] == ["team/mine"]
    monkeypatch.setenv("GLIP_RECIPES_DIR", str(tmp_path / "nope"))
    with pytest.raises(RecipeError, match="GLIP_RECIPES_DIR"):
        recipes_dir()


def test_shipped_folders_are_found():
    assert recipes_dir() == REPO / "recipes"
    assert (REPO / "prompts" / "README.md").is_file() and (REPO / "recipes" / "README.md").is_file()


# --------------------------------------------------------------------------- the CLI


@pytest.fixture()
def run(vocab_dir, monkeypatch):
    from glip_transfer.commands.recipes import app

    monkeypatch.setenv("GLIP_TOKENIZER", str(vocab_dir))
    monkeypatch.setenv("COLUMNS", "80")
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, list(args))

    return invoke


def test_cli_list(run):
    result = run("list")
    assert result.exit_code == 0, result.output
    assert "odinw35/aquarium" in result.output and "lvis-minival" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    data = json.loads(run("list", "--json").output)
    assert len(data) == 55  # 49 ODinW, COCO, 2 LVIS, 3 synthetic
    entry = next(d for d in data if d["name"] == "odinw35/Aquarium_Aquarium_Combined.v2-raw-1024.coco")
    assert entry["aliases"] == ["odinw35/aquarium"] and entry["categories"] == 7 and entry["prompts"]


def test_cli_show_json(run):
    result = run("show", "odinw35/aquarium", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["caption"] == OFFICIAL_CAPTIONS["odinw35/Aquarium_Aquarium_Combined.v2-raw-1024.coco"]
    assert data["categories"][0] == {"id": 1, "name": "fish"} and len(data["categories"]) == 7
    assert data["chunked"] is False and data["prompt_entries"][2]["suffix"] == " , which is black and white"
    boggle = json.loads(run("show", "odinw35/boggleboards", "--json").output)
    assert {"id": 28, "name": "t\\"} in boggle["categories"] and {"id": 21, "name": "o "} in boggle["categories"]


def test_cli_show_lvis_with_data_root(run, tmp_path):
    fake_lvis(tmp_path, 90)
    data = json.loads(run("show", "lvis-minival", "--json", "--data-root", str(tmp_path)).output)
    assert isinstance(data["caption"], list) and len(data["caption"]) == 3 and data["chunked"]
    assert len(data["categories"]) == 90
    plain = json.loads(run("show", "lvis-minival", "--json").output)
    assert plain["caption"] is None and plain["categories"] == "from_annotations"


def test_cli_show_text_and_errors(run, tmp_path):
    result = run("show", "odinw35/chesspieces")
    assert result.exit_code == 0, result.output
    assert '" . black bishop.' in result.output and '"  "' in result.output
    result = run("show", "no-such-recipe")
    assert result.exit_code == 2
    assert "unknown recipe" in result.output
    result = run("show", "odinw35/aquarium", "--json", "--tokenizer", str(tmp_path / "missing"))
    assert result.exit_code == 0  # caption still shown, unchecked, with a notice
    data = json.loads(result.stdout)
    assert data["caption"].startswith(" fish.") and data["tokenizer"] is None
    assert "--tokenizer" in data["notices"][0]


def test_synthetic_recipe_renders_its_data_on_first_use(tmp_path, monkeypatch):
    import dataclasses

    from glip_transfer.recipes import split_paths
    from glip_transfer.synth import SPLITS

    monkeypatch.setitem(
        SPLITS, "shifted", dataclasses.replace(SPLITS["shifted"], subsets={"train": 4, "val": 2, "test": 2})
    )
    recipe = load_recipe("demo/shifted")
    assert recipe.weights == "glip-nano" and recipe.synthetic.split == "shifted"
    said = []
    ann, img = split_paths(recipe, "val", tmp_path, notify=said.append)
    assert ann == tmp_path / "synth/shifted/val.json" and len(list(img.iterdir())) == 2
    assert len(said) == 1 and "first use" in said[0]
    assert split_paths(recipe, "test", tmp_path, notify=said.append)[0].is_file() and len(said) == 1
    few = tmp_path / recipe.few_shot.ann_file("train", 3, 30)
    assert few.is_file()
    other = load_recipe("coco")
    with pytest.raises(FileNotFoundError, match="check --data-root"):
        split_paths(other, None, tmp_path)


def test_pretraining_recipe_settings():
    from glip_transfer.training.config import pretrain_config

    recipe = load_recipe("nano/pretrain")
    cfg = pretrain_config(recipe.pretraining.train)
    assert recipe.pretraining.variant == "glip-nano"
    assert cfg.frozen == ("language_backbone",) and cfg.flip_prob == 0.0
    assert pretrain_config().frozen == () and pretrain_config().batch_size == 64
