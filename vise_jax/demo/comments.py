"""Synthetic comments for the demo world.

A comment mostly expresses a mood: the post's own with probability
``spec.comment_mood_fidelity``, otherwise another one (people disagree). Some comments mention
the object in the picture, some are off-topic noise (spam with fake links, "first!", tagging a
friend, short non-Latin-script phrases). Surface variety comes from templates with slots
(openers, intensifiers, adjectives, stock phrases), casing and punctuation changes, emoji and
character-level typos, so that a text encoder plus k-means finds meaningful but imperfect
clusters.

The tables ``MOOD_LEXICON`` and ``OBJECT_NOUNS`` are ordered like
``vise_jax.demo.world.MOODS`` and ``OBJECTS``; world.py checks this at import.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vise_jax.demo.spec import WorldSpec


@dataclasses.dataclass(frozen=True)
class MoodWords:
    adjectives: tuple[str, ...]
    feelings: tuple[str, ...]  # completes "makes me feel ..."
    phrases: tuple[str, ...]  # whole stock comments
    emoji: tuple[str, ...]


MOOD_LEXICON: dict[str, MoodWords] = {
    'joy': MoodWords(
        adjectives=(
            'happy',
            'joyful',
            'cheerful',
            'fun',
            'delightful',
            'adorable',
            'lovely',
            'cute',
            'sunny',
            'playful',
            'wholesome',
            'bubbly',
        ),
        feelings=('happy', 'so happy', 'cheerful', 'giddy', 'warm inside', 'like a kid again'),
        phrases=(
            'this made my day',
            "can't stop smiling",
            'pure happiness',
            'love love love this',
            'so much fun',
            'this is pure joy',
            'happy vibes only',
            'smiling so hard rn',
            'what a mood booster',
            'living for this',
            "best thing i've seen all day",
            'lol this is great',
            "i'm grinning",
            'yay',
            'haha love it',
            'this sparks joy',
        ),
        emoji=('😄', '😂', '🎉', '😊', '🥳', '😁', '☀️', '💛'),
    ),
    'calm': MoodWords(
        adjectives=(
            'peaceful',
            'calm',
            'serene',
            'relaxing',
            'soothing',
            'tranquil',
            'quiet',
            'gentle',
            'chill',
            'cozy',
            'restful',
            'mellow',
        ),
        feelings=('relaxed', 'at peace', 'calm', 'zen', 'rested', 'at ease'),
        phrases=(
            'so peaceful',
            'i could look at this all day',
            'instant calm',
            'very zen',
            'such a quiet moment',
            'needed this today',
            'breathing slowly now',
            'so chill',
            'pure tranquility',
            'nice and slow',
            'feels like a sunday morning',
            'this is my happy place',
            'stress just melted away',
            'quiet vibes',
            'just breathe',
            'so soft and still',
        ),
        emoji=('😌', '🌿', '🧘', '☺️', '🍃', '💤', '🌊', '🕊️'),
    ),
    'sadness': MoodWords(
        adjectives=(
            'sad',
            'heartbreaking',
            'lonely',
            'gloomy',
            'melancholic',
            'depressing',
            'bleak',
            'sorrowful',
            'tragic',
            'forlorn',
            'somber',
            'dreary',
        ),
        feelings=('sad', 'empty', 'lonely', 'heartbroken', 'down', 'like crying'),
        phrases=(
            'this makes me cry',
            'so sad',
            'my heart hurts',
            'i miss those days',
            'why is this so sad',
            'tears in my eyes',
            'this broke my heart',
            'feeling so empty',
            'rip',
            'so lonely',
            'it hurts to look at',
            'this is so heavy',
            "i'm not okay",
            'sending hugs',
            'wish things were different',
            'nobody is coming back',
        ),
        emoji=('😢', '😭', '💔', '🥺', '😞', '🌧️', '😔'),
    ),
    'fear': MoodWords(
        adjectives=(
            'scary',
            'creepy',
            'terrifying',
            'spooky',
            'eerie',
            'haunting',
            'disturbing',
            'unsettling',
            'ominous',
            'frightening',
            'sinister',
            'nightmarish',
        ),
        feelings=('scared', 'uneasy', 'terrified', 'nervous', 'creeped out', 'on edge'),
        phrases=(
            'nope nope nope',
            'this gives me chills',
            "i'm scared",
            'who would go there at night',
            'this is nightmare fuel',
            "don't look behind you",
            'i got goosebumps',
            'something is watching',
            'hell no',
            'not sleeping tonight',
            'run',
            'this feels wrong',
            'why is it so dark',
            'i have a bad feeling',
            'kinda creepy ngl',
            'what is that in the shadows',
        ),
        emoji=('😱', '😨', '👻', '😰', '💀', '🙀', '😬'),
    ),
    'anger': MoodWords(
        adjectives=(
            'outrageous',
            'infuriating',
            'disgusting',
            'unacceptable',
            'ridiculous',
            'shameful',
            'awful',
            'pathetic',
            'terrible',
            'maddening',
            'offensive',
            'insulting',
        ),
        feelings=('angry', 'furious', 'mad', 'pissed off', 'livid', 'so done'),
        phrases=(
            'this makes me so mad',
            'unacceptable',
            'who did this',
            'this is a disgrace',
            'absolutely ridiculous',
            "i'm furious",
            'how is this allowed',
            'someone should be fired',
            'so sick of this',
            'shame on them',
            'what a joke',
            "this is why we can't have nice things",
            "i can't believe this",
            'enough is enough',
            'ugh this is awful',
            'who approved this',
        ),
        emoji=('😡', '🤬', '😤', '👿', '💢', '👎'),
    ),
    'awe': MoodWords(
        adjectives=(
            'breathtaking',
            'stunning',
            'majestic',
            'incredible',
            'magnificent',
            'epic',
            'spectacular',
            'unreal',
            'astonishing',
            'gorgeous',
            'sublime',
            'awesome',
        ),
        feelings=('amazed', 'tiny', 'speechless', 'in awe', 'blown away', 'inspired'),
        phrases=(
            'wow just wow',
            'speechless',
            'nature is amazing',
            'mind blown',
            'how is this real',
            'i have no words',
            'this is unreal',
            'absolutely stunning',
            'what a view',
            'goosebumps, in a good way',
            'this belongs in a museum',
            'incredible shot',
            'the scale of this',
            'out of this world',
            'takes my breath away',
            'the light is magical',
        ),
        emoji=('😮', '🤩', '✨', '😍', '🌌', '🙌', '💫'),
    ),
}

# Several names per object: people say "kitty" as well as "cat". None starts with a vowel, so
# the templates' "a {obj}" reads right.
OBJECT_NOUNS: dict[str, tuple[str, ...]] = {
    'ball': ('ball', 'beach ball', 'little ball', 'bouncy ball'),
    'house': ('house', 'little house', 'home', 'cottage', 'cabin'),
    'tree': ('tree', 'little tree', 'tree', 'bush'),
    'mountain': ('mountain', 'peak', 'mountain', 'summit', 'hill'),
    'flower': ('flower', 'bloom', 'daisy', 'flower', 'blossom'),
    'car': ('car', 'ride', 'little car', 'car', 'truck'),
    'boat': ('boat', 'sailboat', 'little boat', 'ship', 'boat'),
    'fish': ('fish', 'goldfish', 'fishy', 'little fish'),
    'star': ('star', 'little star', 'star', 'shining star'),
    'cat': ('cat', 'kitty', 'cat', 'kitten', 'cat face'),
}

OPENERS = (
    'omg',
    'wow',
    'honestly',
    'ngl',
    'ok but',
    'man',
    'lol',
    'damn',
    'oh',
    'yes',
    'seriously',
    'idk why but',
    'not gonna lie',
    'i mean',
    'ok',
)
INTENSIFIERS = (
    'so',
    'really',
    'super',
    'very',
    'incredibly',
    'sooo',
    'kinda',
    'truly',
    'absolutely',
    'way too',
    'pretty',
    'extremely',
)

MOOD_TEMPLATES = (
    '{phrase}',
    '{phrase}',
    '{opener} {phrase}',
    '{intens} {adj}',
    'this is {intens} {adj}',
    '{opener} this is {adj}',
    '{adj}',
    'makes me feel {feeling}',
    'i feel {feeling} looking at this',
    '{adj} and {adj2}',
    'what a {adj} picture',
    '{adj} vibes',
    'such a {adj} shot',
    '{opener}, so {adj}',
    '{phrase}. {intens} {adj}',
    'this picture is {adj}',
    'feeling {feeling}',
    '{intens} {adj} tbh',
    'why does this make me feel {feeling}',
    '{adj}! {phrase}',
)
OBJECT_MOOD_TEMPLATES = (
    'the {obj} looks {intens} {adj}',
    '{adj} {obj}',
    'that {obj} is {adj}',
    'this {obj} makes me feel {feeling}',
    '{opener} the {obj}... {phrase}',
    'a {adj} little {obj}',
    'the {obj}!! {phrase}',
    'such a {adj} {obj}',
)
OBJECT_TEMPLATES = (
    'love the {obj}',
    'nice {obj}',
    'is that a {obj}?',
    'look at that {obj}',
    'the {obj}!!',
    'that {obj} though',
    'i want that {obj}',
    'what kind of {obj} is that',
    '{obj} gang',
    'the {obj} in the middle',
    'i have a {obj} just like this',
    'cool {obj}',
)

OFF_TOPIC = (
    'first!',
    'first',
    'follow me for more',
    'who is here in 2026?',
    "who's watching in 2026",
    'check out my page',
    'nice pic',
    'cool',
    'bump',
    'following',
    'same',
    'ok',
    '?',
    'link?',
    'where is this?',
    'what camera did you use?',
    'source?',
    'repost',
    'i was here',
    'anyone else here from the other post?',
    'hello from brazil',
    'dm me',
    'notice me pls',
    'sub to my channel',
    'me',
    'lol',
    'hi',
    'wait what',
)
SPAM_TEMPLATES = (
    'free followers at {link}',
    'win a prize: {link}',
    'click here {link}',
    'make $500/day from home {link}',
    'check my bio {link}',
    'cheap sunglasses {link}',
)
TAG_TEMPLATES = (
    '@{name}',
    '@{name} look at this',
    '@{name} @{name2}',
    '@{name} this is so you',
    '@{name} remember this?',
    '@{name} we need to go here',
)
# Real data is multilingual; these are noise for an English-centred pipeline.
NON_LATIN = (
    'すごい！',
    'かわいい',
    'きれい',
    'qué bonito',
    'me encanta',
    'jajaja',
    'increíble',
    'جميل جدا',
    'ما شاء الله',
    '대박',
    'красота',
    'बहुत सुंदर',
    '太美了',
    'génial',
    'ウケる',
)
_HANDLE_SYLLABLES = ('ka', 'mi', 'jo', 'an', 'li', 'sam', 'el', 'ro', 'za', 'ben', 'ta', 'ni')
_LINK_WORDS = ('prize', 'free', 'deal', 'win', 'promo', 'gift', 'cash', 'follow')
RANDOM_EMOJI = ('👍', '🔥', '💯', '👀', '🙏', '❤️', '😎', '🤔', '👏', '🌈', '🐶', '🍕')

_OFF_TOPIC_KINDS = ('generic', 'spam', 'tag', 'non_latin')
_OFF_TOPIC_KIND_WEIGHTS = np.array([0.45, 0.2, 0.2, 0.15])
_MOOD_NAMES = tuple(MOOD_LEXICON)
_OBJECT_NAMES = tuple(OBJECT_NOUNS)

# Style rates: how often a comment gets each surface variation.
_EMOJI_ONLY_RATE = 0.05
_MOOD_EMOJI_RATE = 0.3
_RANDOM_EMOJI_RATE = 0.05
_OBJECT_ONLY_SHARE = 0.35  # of object-mentioning comments, those that carry no mood words


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    # Indexing is much faster than rng.choice on a Python sequence.
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------
# Comment content


def _fill_mood_template(
    template: str, rng: np.random.Generator, words: MoodWords, object_noun: str = ''
) -> str:
    adjective = _pick(rng, words.adjectives)
    other_adjectives = [a for a in words.adjectives if a != adjective]
    return template.format(
        adj=adjective,
        adj2=_pick(rng, other_adjectives),
        intens=_pick(rng, INTENSIFIERS),
        feeling=_pick(rng, words.feelings),
        phrase=_pick(rng, words.phrases),
        opener=_pick(rng, OPENERS),
        obj=object_noun,
    )


def _expressed_mood(mood_id: int, rng: np.random.Generator, fidelity: float) -> int:
    """The post's mood with probability ``fidelity``, else a uniformly random other mood."""
    if rng.random() < fidelity:
        return mood_id
    other = int(rng.integers(len(_MOOD_NAMES) - 1))
    return other + (other >= mood_id)


def _on_topic_text(
    object_id: int, mood_id: int, rng: np.random.Generator, spec: WorldSpec
) -> tuple[str, int]:
    """Text of a comment about the post and the mood it expresses."""
    mood = _expressed_mood(mood_id, rng, spec.comment_mood_fidelity)
    words = MOOD_LEXICON[_MOOD_NAMES[mood]]
    if rng.random() < spec.object_mention_rate:
        noun = _pick(rng, OBJECT_NOUNS[_OBJECT_NAMES[object_id]])
        if rng.random() < _OBJECT_ONLY_SHARE:
            return _pick(rng, OBJECT_TEMPLATES).format(obj=noun), mood
        return _fill_mood_template(_pick(rng, OBJECT_MOOD_TEMPLATES), rng, words, noun), mood
    if rng.random() < _EMOJI_ONLY_RATE:
        return ''.join(_pick(rng, words.emoji) for _ in range(int(rng.integers(1, 4)))), mood
    return _fill_mood_template(_pick(rng, MOOD_TEMPLATES), rng, words), mood


def _handle(rng: np.random.Generator) -> str:
    syllables = ''.join(_pick(rng, _HANDLE_SYLLABLES) for _ in range(int(rng.integers(2, 4))))
    digits = str(int(rng.integers(100))) if rng.random() < 0.5 else ''
    return syllables + digits


def _fake_link(rng: np.random.Generator) -> str:
    # Reserved top-level domains (RFC 2606): these can never resolve to a real host.
    top_level = _pick(rng, ('example', 'invalid'))
    host = f'{_pick(rng, _LINK_WORDS)}{int(rng.integers(10, 999))}.{top_level}'
    slug = ''.join(_pick(rng, string.ascii_lowercase) for _ in range(5))
    return f'http://{host}/{slug}' if rng.random() < 0.5 else f'www.{host}/{slug}'


def _off_topic_text(rng: np.random.Generator) -> str:
    kind = _OFF_TOPIC_KINDS[int(rng.choice(len(_OFF_TOPIC_KINDS), p=_OFF_TOPIC_KIND_WEIGHTS))]
    if kind == 'spam':
        return _pick(rng, SPAM_TEMPLATES).format(link=_fake_link(rng))
    if kind == 'tag':
        return _pick(rng, TAG_TEMPLATES).format(name=_handle(rng), name2=_handle(rng))
    if kind == 'non_latin':
        return _pick(rng, NON_LATIN)
    return _pick(rng, OFF_TOPIC)


# ---------------------------------------------------------------------------------------------
# Surface variation


def _vary_case(text: str, rng: np.random.Generator) -> str:
    draw = rng.random()
    if draw < 0.55:
        return text
    if draw < 0.85:
        return text[:1].upper() + text[1:]
    if draw < 0.93:
        return text.upper()
    return text.title()


def _vary_ending(text: str, rng: np.random.Generator) -> str:
    if text[-1:] in '!?.':
        return text
    return text + _pick(rng, ('', '', '', '!', '!!', '!!!', '.', '...', ' :)'))


def _add_typos(text: str, rng: np.random.Generator, rate: float) -> str:
    """Swaps, drops or doubles letters, each letter hit with probability ``rate``."""
    if rate <= 0:
        return text
    hits = np.flatnonzero(rng.random(len(text)) < rate)
    if hits.size == 0:
        return text
    chars = list(text)
    kinds = rng.integers(3, size=hits.size)
    # Right to left, so earlier positions stay valid while the list changes length.
    for position, kind in zip(hits[::-1].tolist(), kinds[::-1].tolist(), strict=True):
        if not chars[position].isascii() or not chars[position].isalpha():
            continue
        if kind == 0 and position + 1 < len(chars):
            chars[position], chars[position + 1] = chars[position + 1], chars[position]
        elif kind == 1 and len(chars) > 1:
            del chars[position]
        else:
            chars.insert(position, chars[position])
    return ''.join(chars)


def _add_emoji(text: str, mood: int | None, rng: np.random.Generator) -> str:
    if mood is not None and rng.random() < _MOOD_EMOJI_RATE:
        emoji = _pick(rng, MOOD_LEXICON[_MOOD_NAMES[mood]].emoji)
        return f'{text} {emoji * int(rng.integers(1, 4))}'
    if rng.random() < _RANDOM_EMOJI_RATE:
        return f'{text} {_pick(rng, RANDOM_EMOJI)}'
    return text


# ---------------------------------------------------------------------------------------------
# Public entry points


def sample_comment(object_id: int, mood_id: int, rng: np.random.Generator, spec: WorldSpec) -> str:
    """One comment on a post with the given object and mood."""
    if rng.random() < spec.off_topic_rate:
        return _add_emoji(_off_topic_text(rng), None, rng)
    text, expressed_mood = _on_topic_text(object_id, mood_id, rng, spec)
    if not any(char.isalpha() for char in text):  # emoji-only: nothing to restyle
        return text
    text = _vary_ending(_vary_case(text, rng), rng)
    text = _add_typos(text, rng, spec.typo_rate)
    return _add_emoji(text, expressed_mood, rng)


def sample_comment_count(rng: np.random.Generator, spec: WorldSpec) -> int:
    """Poisson with a gamma-distributed per-post rate (mean ``spec.mean_comments``).

    The gamma mixing makes counts overdispersed like real engagement: many posts get no
    comments, a few get many. The count is clipped to ``spec.max_comments``.
    """
    if spec.mean_comments <= 0 or spec.max_comments <= 0:
        return 0
    shape = spec.comment_count_shape
    rate = spec.mean_comments * rng.gamma(shape, 1.0 / shape)
    return min(int(rng.poisson(rate)), spec.max_comments)


def sample_comments(
    object_id: int, mood_id: int, rng: np.random.Generator, spec: WorldSpec
) -> tuple[str, ...]:
    """All comments of one post; possibly none."""
    if not 0 <= object_id < len(_OBJECT_NAMES):
        raise ValueError(f'object_id must be in [0, {len(_OBJECT_NAMES)}), got {object_id}')
    if not 0 <= mood_id < len(_MOOD_NAMES):
        raise ValueError(f'mood_id must be in [0, {len(_MOOD_NAMES)}), got {mood_id}')
    count = sample_comment_count(rng, spec)
    return tuple(sample_comment(object_id, mood_id, rng, spec) for _ in range(count))
