window.addEventListener("load", function () {
  var imgs = document.images, bad = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || !imgs[i].naturalWidth) {
      bad++; imgs[i].className += " broken";
      console.error("camsweep-report: missing picture " + imgs[i].getAttribute("src"));
    }
  }
  console.log("camsweep-report: " + (imgs.length - bad) + " of " + imgs.length +
              " pictures loaded");
});
