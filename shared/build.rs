include!("../build-support/link_libtorch.rs");

use std::path::PathBuf;

fn main() {
    link_libtorch();
    compile_checkpoint();
}

// The C++ half of `model::checkpoint`, compiled against the libtorch torch-sys found,
// with the same language standard and C++ ABI as torch-sys' own shim.
fn compile_checkpoint() {
    const SOURCE: &str = "csrc/checkpoint.cpp";
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; is torch-sys a direct dependency?");
    // torch-sys reads headers from `$LIBTORCH_INCLUDE/include` when libtorch's lib and
    // include folders are split, and from beside `lib` otherwise.
    let root = std::env::var_os("LIBTORCH_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(&lib).join(".."));
    let include = root.join("include");
    // Every torch wheel since 2.7 uses the new ABI; torch-sys defaults to it too.
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        // `-isystem` keeps libtorch's own header warnings out of this crate's build.
        .flag(format!("-isystem{}", include.display()))
        .flag(format!(
            "-isystem{}",
            include.join("torch/csrc/api/include").display()
        ))
        .file(SOURCE)
        .compile("coreg_checkpoint");
}
