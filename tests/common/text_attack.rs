//! A frequency-plus-digraph attack on key labels, as someone reading the input topic would run
//! it to get typed text back.
//!
//! The attacker is given more than a real one has: the exact letter and digraph frequencies of
//! the very text that was typed (its language model), and knowledge of the encoding, so they try
//! every span over which labels could stand for the same keys. For each span length, the presses
//! are cut into consecutive spans; in each span the labels are ranked by how often they occur
//! and matched to the symbols ranked by frequency (the classic frequency attack), then the
//! matching is improved by hill climbing on the digraph log-likelihood (swap two labels'
//! symbols, keep the swap when the text becomes no less likely). The attack's score is the
//! share of letter presses whose label it maps to the right letter, at the best span length.
//!
//! Against one label per key for a whole session (a simple substitution) it recovers nearly
//! every letter; against labels drawn fresh for every press it recovers only what the language
//! model alone guesses.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a press typed: a lowercase letter, a punctuation character, ' ', '\n', or '^' (Shift).
pub type Symbol = char;

/// The keys of `text` as typed on a QWERTY keyboard: (evdev code, symbol) per press, Shift
/// pressed before a capital letter.
pub fn presses_of(text: &str) -> Vec<(u32, Symbol)> {
    let mut out = Vec::new();
    for ch in text.chars() {
        if ch.is_ascii_uppercase() {
            out.push((42, '^'));
        }
        let lower = ch.to_ascii_lowercase();
        out.push((evdev_code(lower).unwrap_or_else(|| panic!("no key for {ch:?}")), lower));
    }
    out
}

fn evdev_code(ch: char) -> Option<u32> {
    const LETTERS: [u32; 26] =
        [30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22, 47, 17, 45, 21, 44];
    Some(match ch {
        'a'..='z' => LETTERS[(ch as u8 - b'a') as usize],
        ' ' => 57,
        '\n' => 28,
        ',' => 51,
        '.' => 52,
        '\'' => 40,
        _ => return None,
    })
}

/// Unigram and digraph log-probabilities of a symbol sequence (add-0.1 smoothing).
pub struct LanguageModel {
    /// Symbols, most frequent first.
    ranked: Vec<Symbol>,
    unigram: HashMap<Symbol, f64>,
    digraph: HashMap<(Symbol, Symbol), f64>,
    unseen_digraph: HashMap<Symbol, f64>,
}

impl LanguageModel {
    pub fn of(symbols: &[Symbol]) -> Self {
        let mut counts: HashMap<Symbol, f64> = HashMap::new();
        let mut pairs: HashMap<(Symbol, Symbol), f64> = HashMap::new();
        for &s in symbols {
            *counts.entry(s).or_default() += 1.0;
        }
        for w in symbols.windows(2) {
            *pairs.entry((w[0], w[1])).or_default() += 1.0;
        }
        let v = counts.len() as f64;
        let n = symbols.len() as f64;
        let mut ranked: Vec<Symbol> = counts.keys().copied().collect();
        ranked.sort_by(|a, b| counts[b].total_cmp(&counts[a]).then(a.cmp(b)));
        let unigram = counts.iter().map(|(&s, &c)| (s, (c / n).ln())).collect();
        let digraph = pairs.iter().map(|(&(a, b), &c)| ((a, b), ((c + 0.1) / (counts[&a] + 0.1 * v)).ln())).collect();
        let unseen_digraph = counts.iter().map(|(&a, &c)| (a, (0.1 / (c + 0.1 * v)).ln())).collect();
        Self { ranked, unigram, digraph, unseen_digraph }
    }

    fn pair(&self, a: Symbol, b: Symbol) -> f64 {
        self.digraph.get(&(a, b)).copied().unwrap_or(self.unseen_digraph[&a])
    }

    /// Log-likelihood of `labels` read through `map`.
    fn score(&self, labels: &[u32], map: &HashMap<u32, Symbol>) -> f64 {
        let unigrams: f64 = labels.iter().map(|l| self.unigram[&map[l]]).sum();
        let digraphs: f64 = labels.windows(2).map(|w| self.pair(map[&w[0]], map[&w[1]])).sum();
        unigrams + digraphs
    }
}

/// The attack on one span: a label-to-symbol map.
fn attack_span(model: &LanguageModel, labels: &[u32], rng: &mut ChaCha8Rng) -> HashMap<u32, Symbol> {
    let mut counts: Vec<(u32, usize, usize)> = Vec::new(); // label, count, first position
    for (i, &l) in labels.iter().enumerate() {
        match counts.iter_mut().find(|c| c.0 == l) {
            Some(c) => c.1 += 1,
            None => counts.push((l, 1, i)),
        }
    }
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    let last = *model.ranked.last().expect("a model of some text");
    let mut map: HashMap<u32, Symbol> =
        counts.iter().enumerate().map(|(i, c)| (c.0, model.ranked.get(i).copied().unwrap_or(last))).collect();
    let order: Vec<u32> = counts.iter().map(|c| c.0).collect();
    let mut best = model.score(labels, &map);
    let rounds = if labels.len() < 100 { 400 } else { 3000 };
    for _ in 0..rounds {
        let label = order[rng.random_range(0..order.len())];
        let symbol = model.ranked[rng.random_range(0..model.ranked.len())];
        let old = map[&label];
        if symbol == old {
            continue;
        }
        let holder = order.iter().copied().find(|l| map[l] == symbol);
        map.insert(label, symbol);
        if let Some(h) = holder {
            map.insert(h, old);
        }
        let score = model.score(labels, &map);
        if score >= best {
            best = score;
        } else {
            map.insert(label, old);
            if let Some(h) = holder {
                map.insert(h, symbol);
            }
        }
    }
    map
}

/// Span lengths the attacker tries, presses (0: the whole sequence).
pub const SPANS: [usize; 8] = [8, 12, 16, 24, 32, 64, 256, 0];

/// The share of letter presses the attack maps to the right letter, at each span length.
/// `truth[i]` is what press `i` typed, `labels[i]` the label the stream gave it.
pub fn recovered_letters(model: &LanguageModel, truth: &[Symbol], labels: &[u32], seed: u64) -> Vec<(usize, f64)> {
    assert_eq!(truth.len(), labels.len(), "one label per press");
    let letters = truth.iter().filter(|s| s.is_ascii_lowercase()).count().max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    SPANS
        .iter()
        .map(|&span| {
            let len = if span == 0 { labels.len() } else { span };
            let mut right = 0usize;
            for (t, l) in truth.chunks(len).zip(labels.chunks(len)) {
                let map = attack_span(model, l, &mut rng);
                right += t.iter().zip(l).filter(|(s, l)| s.is_ascii_lowercase() && map[l] == **s).count();
            }
            (span, right as f64 / letters as f64)
        })
        .collect()
}

/// The attack's best share over span lengths.
pub fn best(shares: &[(usize, f64)]) -> f64 {
    shares.iter().map(|s| s.1).fold(0.0, f64::max)
}
