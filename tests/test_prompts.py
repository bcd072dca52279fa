"""Captions, spans, positive maps, chunks and free-text prompts against the official semantics."""

from __future__ import annotations

import warnings

import pytest
import torch

from glip_transfer.prompts import (
    MAX_QUERY_LEN,
    CategoryPrompt,
    PromptError,
    as_categories,
    build_caption,
    build_detection_prompt,
    clean_name,
    label_to_tokens,
    labels_to_category_ids,
    parse_prompt_entries,
    phrase_caption,
    phrase_prompt,
    positive_map,
    span_to_tokens,
    split_to_fit,
    token_count,
    tokenize,
)

ASTRONAUT = ["person", "rocket", "american flag", "helmet", "glove"]
ASTRONAUT_CAPTION = "person. rocket. american flag. helmet. glove"
ASTRONAUT_SPANS = [[(0, 6)], [(8, 14)], [(16, 29)], [(31, 37)], [(39, 44)]]
ASTRONAUT_IDS = [101, 2711, 1012, 7596, 1012, 2137, 5210, 1012, 10412, 1012, 15913, 102]
ASTRONAUT_TOKENS = {1: [1], 2: [3], 3: [5, 6], 4: [8], 5: [10]}

AQUARIUM = [
    (1, "fish"),
    (2, "jellyfish"),
    (3, "penguin"),
    (4, "puffin"),
    (5, "shark"),
    (6, "starfish"),
    (7, "stingray"),
]
AQUARIUM_PROMPT = [  # configs/odinw_35/Aquarium_Aquarium_Combined.v2-raw-1024.coco.yaml CAPTION_PROMPT
    {"id": 1, "prefix": " ", "name": "fish", "suffix": ""},
    {"id": 2, "prefix": "", "name": "jellyfish", "suffix": ""},
    {"id": 3, "prefix": "", "name": "penguin", "suffix": " , which is black and white"},
    {"id": 4, "prefix": "", "name": "puffin", "suffix": " with orange beaks "},
    {"id": 5, "prefix": "", "name": "shark", "suffix": ""},
    {"id": 6, "prefix": "", "name": "starfish", "suffix": ""},
    {"id": 7, "prefix": "", "name": "stingray", "suffix": " which is flat and round"},
]
AQUARIUM_CAPTION = (
    " fish. jellyfish. penguin , which is black and white. puffin with orange beaks . shark. starfish. "
    "stingray which is flat and round"
)


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, cleaned",
    [
        ("person", "person"),
        ("traffic_light", "traffic light"),
        ("bolt_(fastener)", "bolt "),  # LVIS: parentheses removed, the underscore leaves a trailing space
        ("a (b) c (d)", "a "),  # greedy: first "(" to last ")"
        ("a    b", "a  b"),  # ONE pass: four spaces become two
        ("   ", "  "),
        ("  ", " "),  # ChessPieces' category 1
        ("o ", "o "),  # boggleBoards
        ("t\\", "t\\"),  # boggleBoards: t and one backslash
        ("cat-British_Shorthair", "cat-British Shorthair"),
        ("small__fish", "small fish"),  # "__" -> two spaces -> one
    ],
)
def test_clean_name(name, cleaned):
    assert clean_name(name) == cleaned


def test_as_categories_forms():
    pairs = [(1, "a"), (3, "b")]
    assert as_categories({1: "a", 3: "b"}) == pairs
    assert as_categories([{"id": 1, "name": "a"}, {"id": 3, "name": "b", "supercategory": "x"}]) == pairs
    assert as_categories(pairs) == pairs
    assert as_categories(["a", "b"]) == [(1, "a"), (2, "b")]
    with pytest.raises(PromptError):
        as_categories([{"id": 1}])
    with pytest.raises(PromptError):
        as_categories("a, b")


# --------------------------------------------------------------------------- captions and spans


def test_astronaut_caption_and_spans():
    caption = build_caption(ASTRONAUT)
    assert caption.text == ASTRONAUT_CAPTION
    assert caption.spans_per_label == ASTRONAUT_SPANS
    assert caption.label_to_category_id == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}
    for name, spans in zip(ASTRONAUT, caption.spans_per_label):
        ((start, end),) = spans
        assert caption.text[start:end] == name


def test_caption_sorted_by_id_no_trailing_separator():
    caption = build_caption({5: "zebra", 2: "cat_dog", 9: "bolt_(fastener)"})
    assert caption.text == "cat dog. zebra. bolt "
    assert caption.category_ids == [2, 5, 9]
    assert caption.names == ["cat_dog", "zebra", "bolt_(fastener)"]  # display names are not cleaned
    assert caption.spans_per_label == [[(0, 7)], [(9, 14)], [(16, 21)]]
    assert build_caption({5: "zebra", 2: "cat"}, sort=False).text == "zebra. cat"


def test_aquarium_caption_prompt_exact():
    prompts = parse_prompt_entries({"categories": AQUARIUM_PROMPT}, "aquarium")
    caption = build_caption(AQUARIUM, prompts)
    assert caption.text == AQUARIUM_CAPTION
    assert caption.text.startswith(" fish")
    # the span covers the name only, never prefix or suffix
    assert [caption.text[s:e] for ((s, e),) in caption.spans_per_label] == [n for _, n in AQUARIUM]
    assert caption.spans_per_label[0] == [(1, 5)]
    assert caption.names == [n for _, n in AQUARIUM]


def test_caption_prompt_name_not_cleaned_but_override_is():
    prompts = {
        1: CategoryPrompt(1, prefix="a ", name="small_fish", suffix=" here"),
        2: CategoryPrompt(2, override="big_(huge) crab"),
        3: CategoryPrompt(3, suffix=" swimming"),  # no name: the cleaned category name
    }
    caption = build_caption([(1, "x"), (2, "crab"), (3, "sea_horse")], prompts)
    assert caption.text == "a small_fish here. big crab. sea horse swimming"
    assert caption.names == ["x", "big_(huge) crab", "sea_horse"]
    start, end = caption.spans_per_label[0][0]
    assert caption.text[start:end] == "small_fish"


def test_single_category_prompts():
    cases = {
        "there is a package on the porch": CategoryPrompt(
            1, prefix="there is a ", name="package", suffix=" on the porch"
        ),
        "there are some holes on the road": CategoryPrompt(
            1, prefix="there are some ", name="holes", suffix=" on the road"
        ),
        " hand of a person": CategoryPrompt(1, prefix=" ", name="hand", suffix=" of a person"),
    }
    for text, prompt in cases.items():
        assert build_caption([(1, "whatever")], {1: prompt}).text == text


def test_prompt_entries_errors():
    with pytest.raises(PromptError, match=r"categories\[0\]: missing 'id'"):
        parse_prompt_entries({"categories": [{"override": "x"}]}, "p.yaml")
    with pytest.raises(PromptError, match="unknown key 'prefx'"):
        parse_prompt_entries({"categories": [{"id": 1, "prefx": "a"}]}, "p.yaml")
    with pytest.raises(PromptError, match="changes nothing"):
        parse_prompt_entries([{"id": 1}], "p.yaml")
    with pytest.raises(PromptError, match="two entries"):
        parse_prompt_entries([{"id": 1, "override": "a"}, {"id": 1, "override": "b"}], "p.yaml")
    with pytest.raises(PromptError, match=r"\.name: expected text"):
        parse_prompt_entries([{"id": 1, "name": 3}], "p.yaml")
    with pytest.raises(PromptError, match="no 'categories'"):
        parse_prompt_entries({}, "p.yaml")


def test_load_prompt_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        'categories:\n  - {id: 1, prefix: " ", name: "fish", suffix: ""}\n  - {id: 2, override: "t\\\\", note: "x"}\n'
    )
    prompts = load_prompt_file_ok(path)
    assert prompts[1] == CategoryPrompt(1, prefix=" ", name="fish", suffix="")
    assert prompts[2].override == "t\\"
    bad = tmp_path / "bad.yaml"
    bad.write_text("categories: [\n")
    with pytest.raises(PromptError) as e:
        load_prompt_file_ok(bad)
    assert "bad.yaml" in one_line(e)


def load_prompt_file_ok(path):
    from glip_transfer.prompts import load_prompt_file

    return load_prompt_file(path)


# --------------------------------------------------------------------------- tokens and positive maps


def test_astronaut_tokens_and_positive_map(tokenizer):
    encoding = tokenize(tokenizer, ASTRONAUT_CAPTION)
    assert set(encoding.keys()) == {"input_ids", "attention_mask"}
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    assert ids.shape == (1, MAX_QUERY_LEN) and ids.dtype == torch.int64
    assert ids[0, :12].tolist() == ASTRONAUT_IDS
    assert int(ids[0, 12:].abs().sum()) == 0
    assert mask[0].tolist() == [1] * 12 + [0] * (MAX_QUERY_LEN - 12)
    pmap = positive_map(encoding, ASTRONAUT_SPANS, names=ASTRONAUT)
    assert pmap.matrix.shape == (5, MAX_QUERY_LEN) and pmap.matrix.dtype == torch.float32
    assert label_to_tokens(pmap.matrix) == ASTRONAUT_TOKENS
    assert pmap.undetectable == []
    assert set(pmap.matrix.unique().tolist()) == {0.0, 1.0}


def test_astronaut_matches_reference(tokenizer, reference_dir):
    from safetensors import safe_open

    with safe_open(str(reference_dir / "glip_tiny_astronaut.safetensors"), "pt") as f:
        ref_ids = f.get_tensor("text.input_ids")
        ref_mask = f.get_tensor("text.attention_mask")
        ref_map = f.get_tensor("text.positive_map")
    prompt = build_detection_prompt(tokenizer, ASTRONAUT)
    (chunk,) = prompt.chunks
    assert chunk.text == ASTRONAUT_CAPTION
    encoding = tokenize(tokenizer, chunk.text)
    assert torch.equal(encoding["input_ids"], ref_ids.to(torch.int64))
    assert torch.equal(encoding["attention_mask"], ref_mask.to(torch.int64))
    assert torch.equal(chunk.positive_map, ref_map.to(torch.float32))
    assert chunk.label_to_tokens == ASTRONAUT_TOKENS


def test_span_fallbacks(tokenizer):
    enc = tokenizer("bolt . cat")
    # end - 1 is a space -> end - 2
    assert span_to_tokens(enc, 0, 5) == (1, 1)
    enc = tokenizer(" fish. dog")
    # start on a space -> start + 1
    assert span_to_tokens(enc, 0, 5) == (1, 1)
    # two spaces before: start + 2
    enc = tokenizer("  fish")
    assert span_to_tokens(enc, 0, 6) == (1, 1)
    # three: no token within the fallbacks
    enc = tokenizer("   fish")
    assert span_to_tokens(enc, 0, 7) is None
    # a negative position (empty name at 0) is "no token", not an error
    enc = tokenizer(". dog")
    assert span_to_tokens(enc, 0, 0) is None


def test_names_that_tokenize_to_nothing(tokenizer):
    # ChessPieces' category "  " (two spaces) cleans to " ": no token of its own, as in the official run
    with pytest.warns(UserWarning, match="cannot be detected: '  '"):
        prompt = build_detection_prompt(tokenizer, [(1, "  "), (2, "black bishop"), (3, "")])
    assert prompt.captions == [" . black bishop. "]
    assert prompt.undetectable == ["  ", ""]
    rows = prompt.chunks[0].positive_map.sum(dim=1).tolist()
    assert rows[0] == 0 and rows[1] == 2 and rows[2] == 0
    # positive_map reports by name, or by label without names; warn=False stays quiet
    enc = tokenizer("dog.  ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = positive_map(enc, [[(0, 3)], [(5, 6)]], warn=False)
    assert result.undetectable == ["label 2"]


def test_empty_name_between_others(tokenizer):
    caption = build_caption([(1, "dog"), (2, ""), (3, "cat")])
    assert caption.text == "dog. . cat"
    with pytest.warns(UserWarning):
        pmap = positive_map(tokenizer(caption.text), caption.spans_per_label, names=caption.names)
    assert label_to_tokens(pmap.matrix) == {1: [1], 2: [], 3: [4]}


def test_tokenize_never_cuts(tokenizer):
    long = ". ".join(["dog"] * 127)  # 127 words + 126 periods + 2 specials = 255 tokens
    assert token_count(tokenizer, long) == 255
    assert tokenize(tokenizer, long)["attention_mask"].sum() == 255
    longer = long + ". cat"
    assert token_count(tokenizer, longer) == 257
    with pytest.raises(PromptError) as e:
        tokenize(tokenizer, [long, longer])
    assert "257 tokens" in one_line(e) and "chunk" in str(e.value)
    batch = tokenize(tokenizer, ["dog", "cat. dog"])
    assert batch["input_ids"].shape == (2, MAX_QUERY_LEN)


def test_positive_map_rejects_batches_and_long_spans(tokenizer):
    batch = tokenizer(["dog", "cat"])
    with pytest.raises(PromptError, match="one caption"):
        positive_map(batch, [[(0, 3)]])
    # a single encoding out of a batch works
    assert label_to_tokens(positive_map(batch[1], [[(0, 3)]]).matrix) == {1: [1]}
    text = ". ".join(["dog"] * 130)
    with pytest.raises(PromptError, match="past the 256"):
        positive_map(tokenizer(text), [[(len(text) - 3, len(text))]])


def test_labels_to_category_ids():
    mapping = {1: 7, 2: 90}
    assert labels_to_category_ids(torch.tensor([2, 1, 2]), mapping) == [90, 7, 90]
    with pytest.raises(PromptError, match="label 3"):
        labels_to_category_ids([3], mapping)


# --------------------------------------------------------------------------- detection prompts and chunks


def test_detection_prompt_single(tokenizer):
    prompts = parse_prompt_entries(AQUARIUM_PROMPT)
    prompt = build_detection_prompt(tokenizer, list(reversed(AQUARIUM)), prompts)
    assert not prompt.chunked and prompt.notices == ()
    assert prompt.caption_or_captions == AQUARIUM_CAPTION
    chunk = prompt.chunks[0]
    assert chunk.category_ids == [1, 2, 3, 4, 5, 6, 7]
    assert chunk.label_to_category_id == {i: i for i in range(1, 8)}
    assert all(tokens for tokens in chunk.label_to_tokens.values())


def test_three_hundred_categories_are_chunked(tokenizer):
    categories = [(1000 + i, f"object number {i}") for i in range(300)]  # ids not starting at 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no category may become undetectable
        prompt = build_detection_prompt(tokenizer, categories)
    assert prompt.chunked and len(prompt.chunks) >= 3
    assert len(prompt.notices) == 1 and "split into" in prompt.notices[0]
    assert prompt.category_ids == [cid for cid, _ in categories]  # every category once, in id order
    for chunk in prompt.chunks:
        assert token_count(tokenizer, chunk.text) <= MAX_QUERY_LEN
        assert chunk.text == build_caption(list(zip(chunk.category_ids, chunk.names))).text  # built the same way
        assert chunk.positive_map.shape == (len(chunk.category_ids), MAX_QUERY_LEN)
        assert bool((chunk.positive_map.sum(dim=1) > 0).all())
        for label, tokens in chunk.label_to_tokens.items():
            cid = chunk.label_to_category_id[label]
            ids = tokenize(tokenizer, chunk.text)["input_ids"][0, tokens].tolist()
            assert tokenizer.decode(ids) == f"object number {cid - 1000}"
    # greedy: all but the last chunk are full (adding one more category would not fit)
    sizes = [len(c.category_ids) for c in prompt.chunks]
    first = categories[: sizes[0] + 1]
    assert token_count(tokenizer, build_caption(first).text) > MAX_QUERY_LEN


def test_fixed_chunk_size_as_lvis(tokenizer):
    categories = {i: f"name_{i}" for i in range(1, 101)}
    prompt = build_detection_prompt(tokenizer, categories, chunk_size=40)
    assert [len(c.category_ids) for c in prompt.chunks] == [40, 40, 20]
    assert prompt.notices == ()  # asked for, not automatic
    assert prompt.chunks[1].category_ids == list(range(41, 81))
    assert prompt.chunks[1].text.startswith("name 41. name 42")
    assert prompt.chunks[1].label_to_category_id[1] == 41
    assert prompt.caption_or_captions == prompt.captions
    with pytest.raises(PromptError, match="chunk size"):
        build_detection_prompt(tokenizer, categories, chunk_size=0)


def test_fixed_chunk_too_long_is_split_with_notice(tokenizer):
    categories = [(i, f"long category name number {i}") for i in range(1, 61)]
    prompt = build_detection_prompt(tokenizer, categories, chunk_size=50)
    assert len(prompt.notices) == 1 and "a chunk of 50 categories" in prompt.notices[0]
    assert sum(len(c.category_ids) for c in prompt.chunks) == 60
    assert all(token_count(tokenizer, c.text) <= MAX_QUERY_LEN for c in prompt.chunks)


def test_split_to_fit_single_too_long(tokenizer):
    with pytest.raises(PromptError, match="alone is more than"):
        split_to_fit(tokenizer, [(1, " ".join(["word"] * 300))])


def test_detection_prompt_errors_and_background(tokenizer):
    with pytest.raises(PromptError, match="appears twice"):
        build_detection_prompt(tokenizer, [(1, "a"), (1, "b")])
    with pytest.raises(PromptError, match="id 9"):
        build_detection_prompt(tokenizer, [(1, "a")], {9: CategoryPrompt(9, override="x")})
    prompt = build_detection_prompt(tokenizer, [{"id": 0, "name": "aquarium"}, {"id": 1, "name": "fish"}])
    assert prompt.captions == ["fish"] and prompt.dropped_background == ("aquarium",)
    assert "background" in prompt.notices[0]
    with pytest.raises(PromptError, match="no categories"):
        build_detection_prompt(tokenizer, [(0, "__background__")])


# --------------------------------------------------------------------------- free text


def test_phrases_found_in_prompt():
    caption = phrase_caption("a man riding a red bicycle", ["man", "red bicycle"])
    assert caption.text == "a man riding a red bicycle"
    assert caption.spans_per_label == [[(2, 5)], [(15, 26)]]
    assert caption.names == ["man", "red bicycle"]
    # first occurrence; case-insensitive when there is no exact match
    caption = phrase_caption("The cat sat next to the cat", ["cat", "the CAT"])
    assert caption.spans_per_label == [[(4, 7)], [(0, 7)]]


def test_phrase_absent_or_empty():
    with pytest.raises(PromptError) as e:
        phrase_caption("a man riding a bicycle", ["horse"])
    assert "'horse'" in one_line(e) and "not in the prompt" in str(e.value)
    with pytest.raises(PromptError):
        phrase_caption("a man", [" "])
    with pytest.raises(PromptError):
        phrase_caption("   ")
    with pytest.raises(PromptError):
        phrase_caption(" . . ")


def test_period_splitting():
    text = "  a cat. . the dog .red_car.  "
    caption = phrase_caption(text)
    assert caption.names == ["a cat", "the dog", "red_car"]
    assert [text[s:e] for ((s, e),) in caption.spans_per_label] == ["a cat", "the dog", "red_car"]
    assert caption.label_to_category_id == {1: 1, 2: 2, 3: 3}
    assert caption.text == text  # the prompt is used as given


def test_phrase_prompt_positive_map(tokenizer):
    chunk = phrase_prompt(tokenizer, "a man riding a red bicycle", ["man", "red bicycle"])
    assert chunk.label_to_tokens == {1: [2], 2: [5, 6]}
    with pytest.raises(PromptError, match="tokens"):
        phrase_prompt(tokenizer, " ".join(["word"] * 300))
