window.onerror = function (msg, src, line, col, err) {
  var box = document.getElementById("js-errors");
  box.textContent += "JS error: " + msg + " (line " + line + ")\n";
  document.body.setAttribute("data-js-error", "1");
};
