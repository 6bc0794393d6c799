// Shared by the build scripts of every crate that produces a binary or test linked
// against libtorch (included with `include!`, since a build script cannot depend on a
// workspace crate).
//
// Why: rustc links with `--as-needed`, which drops `libtorch_cuda.so` because no symbol
// of it is referenced directly; CUDA then silently reports unavailable on GPU hosts.
// Forcing it NEEDED keeps CUDA working and still runs on CPU-only machines, because the
// PyPI wheel ships `libtorch_cuda.so` either way. The rpath lets binaries and tests run
// without `LD_LIBRARY_PATH`.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; is torch-sys a direct dependency?");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
