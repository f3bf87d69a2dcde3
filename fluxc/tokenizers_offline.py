"""Tokenizers for the built-in tiny FLUX model, made offline from a small English corpus.

- CLIP: byte-level BPE (vocab dict + merges, ``</w>`` end-of-word suffix) learned by a
  small deterministic merge learner below. Layout like openai's CLIP vocabulary:
  256 byte symbols, the same 256 with ``</w>``, the learned merges, then
  ``<|startoftext|>`` and ``<|endoftext|>`` as the two highest ids (EOS is the highest, so
  pooling at ``argmax(input_ids)`` lands on the first EOS, as in the real model).
- T5: a sentencepiece unigram model trained with the ``sentencepiece`` trainer (one thread,
  no sampling, so it is deterministic), wrapped as transformers' T5 tokenizer with
  ``<pad>=0, </s>=1, <unk>=2`` and 100 ``<extra_id_N>`` sentinels at the end, like t5-v1_1.

Nothing is downloaded. Heavy imports stay inside functions.
"""
from __future__ import annotations

import io
import itertools
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
CLIP_NUM_MERGES = 1200
T5_VOCAB_SIZE = 1000
T5_EXTRA_IDS = 100

# Round-trip check text (also used by the tests).
SAMPLE_PROMPT = "a photo of an astronaut riding a horse on the moon"

_SENTENCES = """\
a photo of an astronaut riding a horse on the moon
a cat holding a sign that says hello world
a portrait of an old man with a grey beard, oil painting, dramatic lighting
a bowl of fresh fruit on a wooden table, still life, soft morning light
a futuristic city skyline at night with neon lights and flying cars
a small red fox sleeping in the snow under a pine tree
an astronaut floating in space above the earth, highly detailed, photorealistic
a watercolor painting of a lighthouse on a rocky coast during a storm
a cozy cabin in the mountains surrounded by autumn trees and a clear lake
a close-up photograph of a hummingbird drinking nectar from a purple flower
a steaming cup of coffee next to an open book on a rainy afternoon
a medieval castle on a hill at sunset, fantasy art, epic composition
a golden retriever puppy playing with a ball in a green garden
a robot painting a picture of a sunflower in an art studio
an underwater scene with colorful coral reefs and tropical fish
a busy street market in the morning with people buying vegetables
the northern lights dancing over a frozen lake in the arctic winter
a vintage car parked in front of a diner in the desert, 1950s style
a dragon flying over a village, breathing fire, cinematic lighting
a bowl of ramen with an egg, noodles and green onions, food photography
a young woman reading a letter by the window, impressionist painting
a skateboarder jumping over stairs in a city park, action shot
a field of lavender under a blue sky with white clouds
a black and white photograph of a train station in the rain
an owl sitting on a branch at night with a full moon behind it
a sailing boat on calm water at dawn, mist over the sea
a chef cooking pasta in a busy restaurant kitchen
a map of an imaginary island with mountains, rivers and forests
a glass of orange juice on a kitchen counter, bright studio light
a panda eating bamboo in a misty forest
children flying kites on a windy beach in summer
a snowy mountain peak reflected in a still alpine lake
a wizard reading an ancient book in a candlelit library
a macro photo of a dew drop on a green leaf
an elephant walking across the savanna at sunrise
a bicycle leaning against a brick wall covered with ivy
a teddy bear sitting on a bed in a child's room
a minimalist poster of a mountain range in pastel colors
a knight in shining armor standing in front of a dark forest
a plate of sushi with salmon, tuna and avocado rolls
a thunderstorm over wheat fields with lightning in the distance
the interior of a modern living room with large windows and plants
a girl with a red umbrella walking through a rainy street
a spaceship landing on a red planet with two moons in the sky
a basket of kittens in the sunshine
a stone bridge over a river in an old european town
an abstract painting with bold shapes and bright colors
a hot air balloon drifting over green hills at sunrise
a jazz band playing music in a dimly lit club
a waterfall in a tropical jungle with birds and flowers
The quick brown fox jumps over the lazy dog.
Hello, World! This is a small test of the tokenizer: numbers 0 1 2 3 4 5 6 7 8 9.
She said: "It's a beautiful day; let's go outside and paint the sky."
What would you like to see? A garden, a river, or a quiet village at night?
Prices went up by 25% in 2024 (or so they say) - see page #7 & the notes @ the end.
ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789
Punctuation: ! " # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~
Accents: cafe café naïve résumé über jalapeño Zürich Ångström façade.
In the morning, John walked to the station; in the evening, Mary drove home.
Paris, London, New York, Tokyo and Berlin are large cities with many museums.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July August September October November December
The artist used oil paint, charcoal, ink, pastel and gouache on canvas and paper.
An Ultra Realistic 8K HDR Photograph, Sharp Focus, Depth of Field, Bokeh, Golden Hour.
Trending on ArtStation, concept art by a famous illustrator, Unreal Engine, octane render.
Warm colors, cool colors, red orange yellow green blue indigo violet pink brown white black.
The scientist looked through the microscope and wrote her observations in a notebook.
We climbed the highest peak, watched the clouds below us, and then walked back down.
Yesterday it rained; today it's sunny; tomorrow, who knows?
A Samurai, a Viking, a Pirate, a Ninja and a Cowboy walk into a bar.
"""

_SUBJECTS = ["a dog", "a cat", "an old man", "a young girl", "a robot", "a horse", "a bird",
             "a tree", "a house", "a boat", "a car", "a flower", "a mountain", "a city",
             "a woman", "a child", "a tiger", "a rabbit", "an airplane", "a castle"]
_ACTIONS = ["standing", "sitting", "running", "sleeping", "walking", "jumping", "flying",
            "reading", "painting", "singing", "dancing", "swimming"]
_PLACES = ["in a forest", "on the beach", "in the city", "under the stars", "in the snow",
           "near a river", "in a garden", "on a mountain", "in the desert", "at the market",
           "in a small room", "on the moon"]
_STYLES = ["photo", "painting", "drawing", "sketch", "illustration", "render", "portrait",
           "landscape", "close-up", "watercolor"]
_ADJECTIVES = ["beautiful", "detailed", "colorful", "dark", "bright", "soft", "sharp",
               "vintage", "modern", "dramatic", "peaceful", "cinematic"]


def corpus_lines() -> list[str]:
    """The built-in English training corpus (deterministic, a few thousand lines)."""
    lines = [s.strip() for s in _SENTENCES.splitlines() if s.strip()]
    combos = itertools.product(_SUBJECTS, _ACTIONS, _PLACES)
    for i, (s, a, p) in enumerate(combos):
        if i % 3:  # keep a third: enough text, still quick to learn from
            continue
        style = _STYLES[i % len(_STYLES)]
        adj = _ADJECTIVES[(i // 7) % len(_ADJECTIVES)]
        lines.append(f"a {adj} {style} of {s} {a} {p}, {i % 97} degrees, number {i % 13}")
    return lines


# ---------------------------------------------------------------------------- CLIP (BPE)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_CLIP_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+", re.IGNORECASE)


def learn_clip_bpe(lines: list[str], num_merges: int = CLIP_NUM_MERGES) -> tuple[dict[str, int], list[str]]:
    """Learn byte-level BPE merges (ties broken by the pair's text, so it is deterministic).
    Returns (vocab, merges) in openai CLIP's layout."""
    b2u = _bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        text = re.sub(r"\s+", " ", line).lower()
        for w in _CLIP_WORD_RE.findall(text):
            syms = [b2u[b] for b in w.encode("utf-8")]
            syms[-1] = syms[-1] + "</w>"
            words[tuple(syms)] += 1

    base = list(b2u.values())
    vocab_list = base + [s + "</w>" for s in base]
    merges: list[str] = []
    word_list = [(list(w), c) for w, c in sorted(words.items())]
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for syms, c in word_list:
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        if pairs[best] < 2:
            break
        merges.append(f"{best[0]} {best[1]}")
        joined = best[0] + best[1]
        vocab_list.append(joined)
        for syms, _c in word_list:
            i = 0
            while i < len(syms) - 1:
                if syms[i] == best[0] and syms[i + 1] == best[1]:
                    syms[i : i + 2] = [joined]
                else:
                    i += 1
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    assert len(vocab) == len(vocab_list), "duplicate BPE symbols"
    return vocab, merges


def make_clip_tokenizer(vocab: dict[str, int] | None = None, merges: list[str] | None = None):
    from transformers import CLIPTokenizer

    if vocab is None or merges is None:
        vocab, merges = learn_clip_bpe(corpus_lines())
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=CLIP_MAX_LENGTH)
    return tok


# ---------------------------------------------------------------------------- T5 (unigram)
def train_t5_spm(out_file: Path, lines: list[str] | None = None, vocab_size: int = T5_VOCAB_SIZE) -> Path:
    """Train a sentencepiece unigram model into out_file (deterministic: one thread, no
    sampling or shuffling, and trained from memory so no file path ends up in the model)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines if lines is not None else corpus_lines()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(buf.getvalue())
    return out_file


def make_t5_tokenizer(spm_model: Path):
    """transformers' T5 tokenizer (tokenizers-backed) built from a sentencepiece model file:
    the model's pieces and scores, its normalizer charsmap, then 100 sentinels."""
    from transformers import T5TokenizerFast

    proto = pb.ModelProto()
    proto.ParseFromString(Path(spm_model).read_bytes())
    vocab = [(p.piece, float(p.score)) for p in proto.pieces]
    if [v[0] for v in vocab[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise RuntimeError(f"unexpected special pieces in {spm_model}: {vocab[:3]}")
    vocab = vocab + [(f"<extra_id_{i}>", 0.0) for i in range(T5_EXTRA_IDS - 1, -1, -1)]
    tok = T5TokenizerFast(
        vocab=vocab,
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
        extra_ids=T5_EXTRA_IDS,
        model_max_length=T5_MAX_LENGTH,
    )
    return tok


def write_tokenizers(clip_dir: Path, t5_dir: Path, work: Path) -> tuple[int, int]:
    """Write both tokenizer folders; returns (clip vocab size, t5 vocab size)."""
    vocab, merges = learn_clip_bpe(corpus_lines())
    clip = make_clip_tokenizer(vocab=vocab, merges=merges)
    clip.save_pretrained(str(clip_dir))
    # The classic slow-tokenizer files too (openai's CLIP folders ship them), for any reader
    # that builds a BPE tokenizer from vocab.json + merges.txt.
    Path(clip_dir, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    Path(clip_dir, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    spm_model = train_t5_spm(Path(work) / "spiece.model")
    t5 = make_t5_tokenizer(spm_model)
    t5.save_pretrained(str(t5_dir))
    shutil.copyfile(spm_model, Path(t5_dir) / "spiece.model")
    check_round_trip(clip, t5)
    return len(clip), len(t5)


def check_round_trip(clip, t5, text: str = SAMPLE_PROMPT) -> None:
    """Raise if either tokenizer does not turn real text into real tokens and back."""
    for name, tok in (("CLIP", clip), ("T5", t5)):
        ids = tok(text)["input_ids"]
        unk = tok.unk_token_id
        # specials at the ends (CLIP: bos + eos, T5: eos); the words in between
        body = [i for i in ids if i not in tok.all_special_ids]
        if len(body) < 5 or (unk is not None and unk in ids and name == "T5"):
            raise RuntimeError(f"{name} tokenizer gave too few/unknown tokens for {text!r}: {ids}")
        back = tok.decode(ids, skip_special_tokens=True).strip()
        if back != text:
            raise RuntimeError(f"{name} tokenizer does not round-trip {text!r}: got {back!r}")
