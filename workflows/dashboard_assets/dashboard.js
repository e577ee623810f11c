// Index page: click a header to sort, type in the box to filter. The location hash can preset both
// (index.html#q=the&sort=1&dir=desc), which is also how the browser test drives them.
// Every page marks <body data-ready="1"> once this script ran without an exception.
(function () {
  "use strict";

  function cellValue(row, col, numeric) {
    var cell = row.cells[col];
    if (numeric) { return parseFloat(cell.getAttribute("data-v")); }
    return cell.textContent.toLowerCase();
  }

  function sortTable(table, col, dir) {
    var header = table.tHead.rows[0].cells[col];
    var numeric = header.getAttribute("data-type") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "asc" ? 1 : -1;
    rows.sort(function (a, b) {
      var x = cellValue(a, col, numeric), y = cellValue(b, col, numeric);
      if (x < y) { return -sign; }
      if (x > y) { return sign; }
      return 0;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) { th.removeAttribute("data-dir"); });
    header.setAttribute("data-dir", dir);
  }

  function filterTable(table, query) {
    var q = query.trim().toLowerCase(), shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      var match = q === "" || row.textContent.toLowerCase().indexOf(q) !== -1;
      row.hidden = !match;
      if (match) { shown += 1; }
    });
    var counter = document.getElementById("shown");
    if (counter) { counter.textContent = String(shown); }
  }

  function hashParams() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv[0]) { out[decodeURIComponent(kv[0])] = decodeURIComponent(kv[1] || ""); }
    });
    return out;
  }

  function initIndex() {
    var table = document.getElementById("features");
    if (!table) { return; }
    var box = document.getElementById("filter");
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener("click", function () {
        sortTable(table, col, th.getAttribute("data-dir") === "desc" ? "asc" : "desc");
      });
    });
    box.addEventListener("input", function () { filterTable(table, box.value); });
    var params = hashParams();
    if (params.sort !== undefined) { sortTable(table, parseInt(params.sort, 10), params.dir === "asc" ? "asc" : "desc"); }
    if (params.q !== undefined) { box.value = params.q; }
    filterTable(table, box.value);
  }

  initIndex();
  document.body.setAttribute("data-ready", "1");
})();
