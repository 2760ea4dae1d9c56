// Tells whether every picture is there: a console line the tests read, missing pictures
// outlined in red. Pictures load lazily (when scrolled to); "#check" in the address loads
// them all at once, so a headless browser can check the whole page.
(function () {
  var imgs = document.images;
  if (location.hash === "#check") {
    for (var i = 0; i < imgs.length; i++) imgs[i].loading = "eager";
  }
  function broken(img) {
    if (/\bbroken\b/.test(img.className)) return;  // said once
    img.className += " broken";
    console.error("camsweep-report: missing picture " + img.getAttribute("src"));
  }
  window.addEventListener("error", function (e) {  // also pictures loaded after the page
    if (e.target && e.target.tagName === "IMG") broken(e.target);
  }, true);
  window.addEventListener("load", function () {
    var loaded = 0, later = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (!imgs[i].complete) later++;
      else if (imgs[i].naturalWidth) loaded++;
      else broken(imgs[i]);
    }
    console.log("camsweep-report: " + loaded + " of " + imgs.length + " pictures loaded" +
                (later ? " (" + later + " load when scrolled to)" : ""));
  });
})();
