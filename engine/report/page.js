// Protocol switch, sorting and filtering of the query cards; every number comes from data attributes.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const cards = Array.from(document.querySelectorAll("article.query"));
  const ap = (card, run, proto) => parseFloat(card.querySelector(`.run[data-run="${run}"]`).getAttribute(`data-ap-${proto}`));
  const delta = (card, run, proto) => ap(card, run, proto) - ap(card, 0, proto);
  const pct = (x) => (isNaN(x) ? "—" : (100 * x).toFixed(2));

  function refreshNumbers(proto) {
    document.body.className = `p-${proto}`;
    for (const card of cards) {
      for (const run of card.querySelectorAll(".run")) {
        const i = run.dataset.run;
        run.querySelector(".ap").textContent = `AP ${pct(ap(card, i, proto))}`;
        const d = run.querySelector(".delta");
        if (!d) continue;
        const v = delta(card, i, proto);
        d.textContent = isNaN(v) ? "" : `Δ ${v > 0 ? "+" : ""}${(100 * v).toFixed(2)}`;
        d.className = `delta${v < 0 ? " lost" : v > 0 ? " won" : ""}`;
      }
    }
    for (const b of document.querySelectorAll("button.loses")) {
      const n = cards.filter((c) => delta(c, b.dataset.run, proto) < 0).length;
      b.querySelector(".n").textContent = `(${n})`;
    }
  }

  function keyOf(card, sort, proto) {
    if (sort === "order") return parseInt(card.dataset.q, 10);
    const [kind, run, dir] = sort.split(":");
    const v = kind === "delta" ? delta(card, run, proto) : ap(card, run, proto);
    return dir === "desc" ? -v : v;
  }

  function keep(card, filter, proto, threshold) {
    if (filter === "all") return true;
    const [kind, run] = filter.split(":");
    if (kind === "loses") return delta(card, run, proto) < 0;
    return ap(card, run, proto) * 100 < threshold;
  }

  function update() {
    const proto = $("protocol").value, sort = $("sort").value, filter = $("filter").value;
    const threshold = parseFloat($("threshold").value);
    refreshNumbers(proto);
    // Queries skipped under this protocol (NaN AP) go last whatever the order.
    const sorted = cards.slice().sort((a, b) => {
      const ka = keyOf(a, sort, proto), kb = keyOf(b, sort, proto);
      if (isNaN(ka) || isNaN(kb)) return isNaN(ka) - isNaN(kb);
      return ka - kb || a.dataset.q - b.dataset.q;
    });
    const list = $("queries");
    let shown = 0;
    for (const card of sorted) {
      card.hidden = !keep(card, filter, proto, threshold);
      shown += !card.hidden;
      list.appendChild(card);
    }
    $("shown").textContent = `${shown} of ${cards.length} queries shown`;
  }

  for (const id of ["protocol", "sort", "filter", "threshold"]) $(id).addEventListener("input", update);
  for (const b of document.querySelectorAll("button.loses")) {
    b.addEventListener("click", () => {
      $("sort").value = `delta:${b.dataset.run}`;
      $("filter").value = `loses:${b.dataset.run}`;
      update();
    });
  }
  update();
})();
