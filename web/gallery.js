// The gallery index: sort by a column (click its header; again to reverse) and filter by status,
// identity score and id. Plain DOM, no framework; the table is complete without this script.
(function () {
  const table = document.getElementById('avatars');
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const statusFilter = document.getElementById('status-filter');
  const scoreFilter = document.getElementById('min-score');
  const idFilter = document.getElementById('id-filter');
  const shown = document.getElementById('shown');
  let sortKey = null, ascending = true;

  function value(row, key, type) {
    const raw = row.cells[key].dataset.value;
    if (type !== 'number') return raw.toLowerCase();
    return raw === '' ? NaN : parseFloat(raw);
  }

  function sortBy(key, type) {
    ascending = sortKey === key ? !ascending : true;
    sortKey = key;
    const sign = ascending ? 1 : -1;
    rows.sort((a, b) => {
      const x = value(a, key, type), y = value(b, key, type);
      if (type === 'number') {  // rows without a value go last either way
        if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
        return sign * (x - y);
      }
      return sign * x.localeCompare(y);
    });
    rows.forEach((row) => body.appendChild(row));
    table.querySelectorAll('th').forEach((th) => th.removeAttribute('aria-sort'));
    table.tHead.rows[0].cells[key].setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
  }

  function filter() {
    const status = statusFilter.value;
    const minScore = scoreFilter && scoreFilter.value !== '' ? parseFloat(scoreFilter.value) : null;
    const text = idFilter.value.trim().toLowerCase();
    let visible = 0;
    rows.forEach((row) => {
      const score = row.dataset.score === '' ? NaN : parseFloat(row.dataset.score);
      const keep = (!status || row.dataset.status === status) &&
        (minScore === null || (!isNaN(score) && score >= minScore)) &&
        (!text || row.cells[1].dataset.value.toLowerCase().includes(text));
      row.hidden = !keep;
      visible += keep;
    });
    shown.textContent = `${visible} of ${rows.length} shown`;
  }

  table.tHead.rows[0].querySelectorAll('th').forEach((th) => {
    th.querySelector('button').addEventListener('click', () => sortBy(Number(th.dataset.key), th.dataset.type));
  });
  [statusFilter, scoreFilter, idFilter].forEach((el) => el && el.addEventListener('input', filter));
  filter();
})();
