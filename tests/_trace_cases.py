"""Varied (prediction, reference[, source]) cases for the TRACE scoring tests: whitespace, casing,
punctuation, empty strings, multi-line code, German text, long summaries. Generated from fixed seeds."""

import random

WORDS = ("the council approved budget park street library funding vote motion public hearing city "
         "residents water project plan report member chair second amendment zoning traffic safety").split()
GERMAN = ("der die das Stadt Zürich Bund Gemeinde Regierung Schweiz Polizei Unfall Montag Kinder Schule "
          "müssen können wurde haben neue Gesetz Straße Bürger größer Öffentlichkeit über für").split()


def _sentence(rng, vocab, lo=3, hi=12, capital=True):
    words = [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]
    if capital:
        words[0] = words[0].capitalize()
    return " ".join(words)


def label_cases():
    """Exact-match labels as TRACE's tasks write them (C-STANCE/FOMC letters, NumGLUE numbers)."""
    base = [("A", "A"), ("B", "A"), ("C", "C"), (" A", "A"), ("A\n", "A"), ("A ", "A"), ("\tB", "B"),
            ("a", "A"), ("A.", "A"), ("A", "A."), ("", "A"), ("", ""), ("   ", "A"), ("\n", "\n"),
            ("3", "3"), ("3.0", "3"), (" 3", "3"), ("3\n\n", "3"), ("16.5", "16.5"), ("16,5", "16.5"),
            ("-2", "-2"), ("2", "-2"), ("B\nBecause", "B"), ("yes", "Yes"), ("支持", "支持"), ("A", " A"),
            ("0", "0"), ("00", "0"), ("1/2", "0.5"), ("A\r\n", "A")]
    rng = random.Random(1)
    for _ in range(30):
        ref = rng.choice(["A", "B", "C", str(rng.randint(0, 99)), f"{rng.randint(0, 9)}.{rng.randint(0, 9)}"])
        pred = rng.choice([ref, ref, " " + ref, ref + "\n", ref.lower(), ref + ".", "", rng.choice("ABC")])
        base.append((pred, ref))
    return base


def scienceqa_cases():
    """ScienceQA answers as TRACE's data has them: the option letter first, then the reasoning."""
    base = [("B\nBecause it is hot.", "B\nBecause the sun is hot."), ("B", "B\nBecause x"),
            (" B\nBecause", "B\nBecause"), ("Answer: B", "B\nBecause"), ("b\nBecause", "B\nBecause"),
            ("", "A\nBecause"), ("A", ""), ("\nA", "A\nx"), ("C. the third", "C\nBecause"),
            ("D\n", "D\nBecause"), ("  ", " A"), ("The answer is A", "A\nBecause")]
    rng = random.Random(2)
    for _ in range(48):
        letter = rng.choice("ABCDE")
        ref = f"{letter}\nBecause {_sentence(rng, WORDS, 2, 8, False)}."
        guess = rng.choice("ABCDE")
        pred = rng.choice([f"{guess}\nBecause {_sentence(rng, WORDS, 1, 6, False)}.", f" {guess}", f"{guess}",
                           f"Answer: {guess}", f"{guess.lower()}\n", ""])
        base.append((pred, ref))
    return base


def summary_cases():
    """MeetingBank-like summaries: sentences, casing, punctuation, blank runs, empty, long texts."""
    base = [("The council approved the budget.", "The council approved the budget."),
            ("the council approved the budget", "The Council approved the budget."),
            ("Budget approved. Council voted.", "The council voted. The budget was approved."),
            ("", "The council met."), ("The council met.", ""), ("   ", "The council met."),
            ("a. ", "a"), (" ", "a. "), ("b a", "a b"), ("a b. c d", "d c. b a"),
            ("Motion passed!", "Motion passed."), ("Motion, passed; 5-2.", "Motion passed 5-2."),
            ("Line one\nline two.", "Line one line two."), ("x", "y"),
            ("Die Stadt Zürich baut eine neue Schule.", "Zürich baut eine Schule."),
            ("1.5 million for parks.", "1.5 million dollars for parks."),
            ("the the the the", "the"), ("Public hearing. Public hearing.", "Public hearing.")]
    rng = random.Random(3)
    for _ in range(30):
        ref = ". ".join(_sentence(rng, WORDS) for _ in range(rng.randint(1, 4))) + "."
        words = ref.split()
        kind = rng.randrange(4)
        if kind == 0:
            pred = " ".join(w for w in words if rng.random() > 0.3)
        elif kind == 1:
            pred = ref.lower()
        elif kind == 2:
            pred = ". ".join(_sentence(rng, WORDS) for _ in range(rng.randint(1, 3)))
        else:
            pred = ref.replace(". ", ".\n")
        base.append((pred, ref))
    for _ in range(4):  # long summaries (hundreds of words, many sentences)
        ref = ". ".join(_sentence(rng, WORDS, 8, 20) for _ in range(20)) + "."
        pred = " ".join(w for w in ref.split() if rng.random() > 0.2)
        base.append((pred, ref))
    return base


def long_sentence_cases():
    """Single sentences of ~1,100 words: the `rouge` package's LCS back-tracking recurses past
    Python's default limit on these."""
    rng = random.Random(4)
    out = []
    for _ in range(3):
        ref = " ".join(rng.choice(WORDS) for _ in range(1100))
        pred = " ".join(w for w in ref.split() if rng.random() > 0.1)
        out.append((pred, ref))
    return out


def code_cases():
    """Py150-like code (TRACE's <EOL> and literal tokens), multi-line code, whitespace, empties."""
    base = [("return foo ( <NUM_LIT:1> )", "return bar ( 1 )"), ("x = <STR_LIT> <EOL>", "x = '' <EOL>"),
            ("<STR_LIT>", "<NUM_LIT>"), ("<STR_LIT>", "x"), ("x", "<CHAR_LIT>"), ("", "x = 1"),
            ("  x = 1", "x = 1"), ("x = 1\n", "x = 1"), ("kitten", "sitting"), ("X = 1", "x = 1"),
            ("self . assertEqual ( a , b )", "self . assertEqual ( b , a )"),
            ("<STR_LIT:a b> + <STR_LIT:a b>", "'a b' + 'a b'"), ("<NUM_LIT:3> <NUM_LIT>", "3 0"),
            ("def f ( x ) : <EOL> return x", "def f ( x ) : <EOL> return x"),
            ("if x is None : <EOL> raise ValueError ( <STR_LIT:bad> )", "if x is None : <EOL> return"),
            ("for i in range ( <NUM_LIT:10> ) :", "for i in range ( 10 ) :")]
    rng = random.Random(5)
    names = ["self", "x", "y", "data", "result", "os", "path", "join", "append", "value", "key", "items"]
    ops = ["=", "(", ")", ".", ",", ":", "+", "[", "]", "<EOL>", "return", "if", "for", "in"]
    for _ in range(28):
        ref = " ".join(rng.choice(names + ops) for _ in range(rng.randint(3, 25)))
        if rng.random() < 0.3:
            ref += f" <NUM_LIT:{rng.randint(0, 99)}>"
        toks = ref.split()
        pred = " ".join(t if rng.random() > 0.25 else rng.choice(names) for t in toks[: rng.randint(1, len(toks))])
        base.append((pred, ref))
    for _ in range(8):  # multi-line code over 200 characters (difflib's popular-character heuristic)
        lines = [f"    {rng.choice(names)} = {rng.choice(names)}.{rng.choice(names)}({rng.choice(names)}, "
                 f"{rng.randint(0, 9)})" for _ in range(rng.randint(6, 14))]
        ref = "def run(self):\n" + "\n".join(lines) + "\n    return result\n"
        pred = "\n".join(line if rng.random() > 0.3 else line.replace("    ", "  ") for line in ref.split("\n"))
        base.append((pred, ref))
    return base


def simplification_cases():
    """20Minuten-like (German) simplifications: (prediction, reference, source)."""
    base = []
    rng = random.Random(6)
    fixed = [("Die Stadt baut eine Schule.", "Die Stadt baut eine neue Schule.",
              "Die Stadt Zürich baut für 50 Millionen Franken eine neue Schule."),
             ("", "Die Polizei sucht Zeugen.", "Die Kantonspolizei Zürich sucht nach dem Unfall vom Montag Zeugen."),
             ("   ", "Kinder müssen zur Schule.", "Alle Kinder in der Schweiz müssen zur Schule gehen."),
             ("\n", "Ein Text.", "Ein längerer Text."),
             ("Die Polizei sucht Zeugen.", "", "Die Polizei sucht Zeugen nach dem Unfall."),
             ("DIE POLIZEI SUCHT ZEUGEN!", "Die Polizei sucht Zeugen.", "Die Polizei sucht Zeugen nach dem Unfall."),
             ("Die Regierung (Bund) hat 1,5 Mio. gesprochen.", "Der Bund gibt 1.5 Millionen.",
              "Die Regierung des Bundes hat gestern einen Kredit von 1,5 Mio. Franken gesprochen."),
             ("Gleich wie die Quelle.", "Gleich wie die Quelle.", "Gleich wie die Quelle."),
             (".", "Ein Satz.", "Ein Satz mit vielen Wörtern."),
             ("Über 100 Bürger kamen - mehr als erwartet.", "Über 100 Bürger kamen.",
              "Über 100 Bürgerinnen und Bürger kamen an die Versammlung, mehr als erwartet."),
             ("&amp; <skipped> Test-\nZeile", "Test Zeile", "Eine Test-\nZeile &quot;hier&quot;")]
    base.extend(fixed)
    for _ in range(45):
        src = " ".join(_sentence(rng, GERMAN, 8, 20) for _ in range(rng.randint(1, 3))) + "."
        words = src.split()
        ref = " ".join(w for w in words if rng.random() > 0.4) + "."
        kind = rng.randrange(5)
        if kind == 0:
            pred = ""
        elif kind == 1:
            pred = src
        elif kind == 2:
            pred = " ".join(w for w in words if rng.random() > 0.5) + rng.choice([".", "!", ""])
        elif kind == 3:
            pred = _sentence(rng, GERMAN, 2, 10) + "."
        else:
            pred = ref.upper()
        base.append((pred, ref, src))
    return base
