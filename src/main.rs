fn main() {
    println!("wisp");
}
