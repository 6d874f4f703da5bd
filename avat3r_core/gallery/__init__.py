"""The avatar library as a static web site: the compact web export and the site builder."""
